"""`llama-conformance`: the whole conformance battery on an implementation, from any directory.

    llama-conformance --impl mypkg.adapter:MyLlama --report out/parity.html [--json out/parity.json] [pytest args]
    llama-conformance doctor --impl mypkg.adapter:MyLlama
    llama-conformance init-adapter --style linen|nnx|jnp --out mypkg/adapter.py

The first runs pytest on the installed `conformance` package with the suite's plugin and the repository's default
selection, ignoring the current directory's pytest configuration so a project's settings and modules cannot leak in
or shadow the suite's; other arguments go to pytest, and the exit status is pytest's. `doctor` and `init-adapter`
(first argument only) run conformance/doctor.py and conformance/init_adapter.py (docs/internals.md#the-command-line).
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from conformance import doctor, init_adapter

PACKAGE = "conformance"
PLUGIN = "conformance.plugin"
DOCTOR = "doctor"  # the first argument that runs the doctor instead of the battery
INIT_ADAPTER = "init-adapter"  # the first argument that writes a skeleton adapter
DEFAULT_MARKERS = "not slow and not browser and not multihost and not ecosystem and not e2e and not real_full"
# pytest marks an entry-point plugin's packages for assertion rewriting, but this command imported `conformance` (the
# package itself, not its test modules, which are still rewritten) before pytest started: that one warning is noise.
QUIET_REWRITE = "ignore:Module already imported so cannot be rewritten; conformance:pytest.PytestAssertRewriteWarning"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llama-conformance", allow_abbrev=False,
        description="Run the tensor-parallel Llama 3.1 conformance battery on an implementation (--impl). "
                    "Arguments not listed here are passed to pytest.",
        epilog="example: llama-conformance --impl mypkg.adapter:MyLlama --report out/parity.html -n 2 -rs; "
               "llama-conformance doctor --impl mypkg.adapter:MyLlama checks the adapter itself in seconds; "
               "llama-conformance init-adapter --style nnx --out mypkg/adapter.py writes a skeleton to start from")
    parser.add_argument("--impl", metavar="MODULE:ATTR",
                        help="the implementation's adapter factory, importable from the current directory "
                             "(default: the built-in tp_llama.adapter:TPLlamaAdapter)")
    parser.add_argument("--report", metavar="HTML", help="write the HTML parity report here (--parity-report)")
    parser.add_argument("--json", metavar="JSON", help="write the parity record here (--parity-json)")
    parser.add_argument("--module", action="append", default=[], metavar="NAME",
                        help="run only this module of the battery, repeatable: test_rmsnorm or "
                             "conformance.test_rmsnorm (default: every module)")
    return parser


def _has_marker_option(args: Sequence[str]) -> bool:
    return any(a == "-m" or (a.startswith("-m") and not a.startswith("--")) for a in args)


def installed_root() -> Path:
    """The directory holding the `conformance` package (site-packages, or the repository for an editable install)."""
    return Path(__file__).resolve().parent.parent


def pytest_args(argv: Sequence[str], cwd: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
                ) -> list[str]:
    """The pytest command line (without `pytest` itself) that `llama-conformance ARGV` runs in directory `cwd`, the
    suite's packages living in `root` (default: installed_root())."""
    options, rest = _parser().parse_known_args(list(argv))
    cwd = Path(cwd)
    root = installed_root() if root is None else Path(root)
    args = ["-p", PLUGIN, "-p", "no:cacheprovider", "-c", os.devnull, "--rootdir", str(root), "-W", QUIET_REWRITE]
    if not _has_marker_option(rest):
        args += ["-m", DEFAULT_MARKERS]
    if options.impl:
        args += ["--impl", options.impl]
    if options.report:
        args += ["--parity-report", str(cwd / options.report)]
    if options.json:
        args += ["--parity-json", str(cwd / options.json)]
    args += rest
    modules = [m if m.startswith(PACKAGE + ".") else f"{PACKAGE}.{m}" for m in options.module]
    args += ["--pyargs", *(modules or [PACKAGE])]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """`doctor ...` runs conformance/doctor.py; anything else is the battery."""
    cwd = os.getcwd()
    argv = list(sys.argv[1:] if argv is None else argv)
    if cwd not in sys.path:
        sys.path.append(cwd)
    if argv[:1] == [DOCTOR]:
        return doctor.main(argv[1:])
    if argv[:1] == [INIT_ADAPTER]:
        return init_adapter.main(argv[1:])
    import pytest

    return int(pytest.main(pytest_args(argv, cwd)))


if __name__ == "__main__":
    sys.exit(main())
