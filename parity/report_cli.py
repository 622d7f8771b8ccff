"""The report as a command over saved --parity-json files: one run, several hosts' runs of one implementation
(merged), or several implementations side by side. The page itself is parity.report's."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from parity.report import ReportError, load_document, plural, render_runs, run_counts, write_html


def main(argv: Sequence[str] | None = None) -> int:
    """python -m parity.report_cli a.json [b.json ...] -o report.html"""
    parser = argparse.ArgumentParser(
        prog="python -m parity.report_cli",
        description="Render one HTML parity report from saved --parity-json files: one run, several hosts' runs "
                    "of one implementation (merged), or several implementations (one column group each).")
    parser.add_argument("json", nargs="+", help="--parity-json files")
    parser.add_argument("-o", "--output", required=True, help="the HTML file to write")
    args = parser.parse_args(argv)
    try:
        documents = [(path, load_document(path)) for path in args.json]
        write_html(args.output, render_runs(documents))
    except ReportError as exc:
        print(f"python -m parity.report_cli: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"python -m parity.report_cli: error: cannot write {args.output}: {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    runs, implementations = run_counts(documents)
    records = sum(len(d["records"]) for _, d in documents)
    print(f"parity report: {args.output} ({plural(runs, 'run')}, "
          f"{plural(implementations, 'implementation')}, {plural(records, 'record')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
