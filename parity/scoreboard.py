"""The scoreboard of docs/public-implementations.md from parity JSON files (no keras needed):

    python -m parity.scoreboard out/kh_direct.json out/kh_hf.json out/kh_hf_hub.json [--diagnoses out/eco.json]

One row per factory (environment.implementation.factory) and dtype. A *check* is one comparison the suite recorded
(a parity record: one tensor of one test against one reference on one mesh); *not checked* counts the entries the
suite could not run on the implementation (a capability or tensor it lacks, named in the JSON's not_checked; entries
of no dtype count in both rows); the
first failing tensor is the earliest failing one in forward order (the full forward's intermediates first, then
the components, then the rest), with the test that recorded it. The diagnosis is the record's own (parity.diagnosis)
when it has one, else that of a diagnosed record of the same tensor, dtype and config.json style in a --diagnoses
file (conformance/test_ecosystem.py diagnoses the converter-loaded model), else what the record's own metrics say
(a failing distance to the reference with a passing noise_ratio: as close to exact math as the reference).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable

from llama_spec.files import InputFileError, read_json

_PER_LAYER = ("attention_norm", "q_rope", "k_rope", "attention_out", "ffn_norm", "mlp_out", "block_out")
_COMPONENTS = ("rmsnorm", "rope", "attention", "mlp", "block", "logits")
DTYPES = ("float32", "bfloat16")
STYLE_OF = {"KerasHubLlamaHF": "rope_parameters", "KerasHubLlamaHFHub": "rope_scaling",
            "EasyDeLLlamaHF": "rope_parameters", "EasyDeLLlamaHFHub": "rope_scaling"}


def forward_rank(name: str | None) -> tuple:
    """Forward order of an intermediate name (reference/layers.py), unknown names last."""
    if name == "embedding":
        return (0, 0, 0)
    m = re.fullmatch(r"layers\.(\d+)\.(\w+)", name or "")
    if m and m.group(2) in _PER_LAYER:
        return (1, int(m.group(1)), _PER_LAYER.index(m.group(2)))
    if name == "final_norm":
        return (2, 0, 0)
    if name and name.startswith("logits"):
        return (3, 0, 0)
    return (4, 0, 0)


def first_failing(records: list[dict]) -> dict | None:
    failed = [r for r in records if not r["passed"]]
    if not failed:
        return None

    def key(r):
        if r["component"] == "intermediate":
            return (0, forward_rank(r.get("name")), 0, r["test"])
        if r["component"] in _COMPONENTS:  # the components in forward order: by layer, then by place in the block
            return (1, (r.get("layer") or 0, _COMPONENTS.index(r["component"])), 0, r["test"])
        return (2, (0, 0), 0, r["test"])

    return min(failed, key=key)


def _factory(document: dict) -> str:
    impl = document["environment"].get("implementation") or {}
    return impl.get("factory") if isinstance(impl, dict) else str(impl)


def _style(factory: str) -> str | None:
    return STYLE_OF.get(factory.rpartition(":")[2])


def diagnosis_for(record: dict, factory: str, diagnosed: Iterable[dict]) -> str:
    if record.get("diagnosis"):
        return record["diagnosis"]["summary"]
    style = _style(factory)
    same = [other for other in (diagnosed if style else ())  # only the converter-loaded factories share them
            if other.get("diagnosis") and other.get("name") == record.get("name")
            and other["dtype"] == record["dtype"] and style in other["test"]]
    same.sort(key=lambda other: other["diagnosis"]["cause"] is None)  # a matched cause first, as the test names it
    if same:
        return same[0]["diagnosis"]["summary"] + f" (from {same[0]['test'].split('::')[-1]})"
    if record.get("error"):
        return "raised: " + record["error"].splitlines()[0][:160]
    return closeness(record) or "no diagnosis recorded"


def closeness(record: dict) -> str | None:
    """What the record's own metrics say when no catalogued deviation was tested: a failing distance to the
    reference with a passing noise_ratio is an output as close to exact math as the reference's own, rounded at
    other points."""
    metrics, bounds = record["metrics"], record["bounds"]
    failing = [k for k in bounds if k in metrics and k != "noise_ratio" and not _passes(k, metrics[k], bounds[k])]
    ratio = metrics.get("noise_ratio")
    if failing and ratio is not None and "noise_ratio" in bounds and ratio <= bounds["noise_ratio"]:
        shown = ", ".join(f"{k} {metrics[k]:.2g} (bound {bounds[k]:.2g})" for k in failing)
        return (f"{shown} against {record['reference']}, but noise_ratio {ratio:.2f} "
                f"(bound {bounds['noise_ratio']:g}): as close to exact math as the reference, rounded at other points")
    return None


def _passes(metric: str, value: float, bound: float) -> bool:
    try:
        from parity.check import passes

        return passes(metric, value, bound)
    except Exception:  # noqa: BLE001 - an upper bound by default
        return value <= bound


def rows(documents: list[dict], diagnosed: list[dict]) -> list[dict[str, Any]]:
    out = []
    for document in documents:
        factory = _factory(document)
        for dtype in DTYPES:
            records = [r for r in document["records"] if r.get("dtype") == dtype]
            not_checked = [e for e in document.get("not_checked", []) if e.get("dtype") in (dtype, None)]
            first = first_failing(records)
            where = None
            if first is not None:
                where = (f"`{first.get('name') or first['component']}` ({first['component']}, vs {first['reference']}, "
                         f"{first['mesh']}; {first['test'].split('::')[-1]})")
            out.append({"factory": factory, "dtype": dtype, "run": len(records),
                        "passed": sum(r["passed"] for r in records), "failed": sum(not r["passed"] for r in records),
                        "not_checked": len(not_checked), "first_failing": where,
                        "diagnosis": diagnosis_for(first, factory, diagnosed) if first else "—",
                        "tests": _tests(document, dtype)})
    return out


def _tests(document: dict, dtype: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for test in document.get("tests", []):
        if f"-{dtype}-" in test["nodeid"] or f"[{dtype}-" in test["nodeid"] or f"-{dtype}]" in test["nodeid"]:
            counts[test["outcome"]] = counts.get(test["outcome"], 0) + 1
    return counts


def versions(documents: list[dict]) -> str:
    env = documents[0]["environment"]
    v = dict(env.get("versions") or {})
    impl = env.get("implementation") or {}
    if isinstance(impl, dict) and impl.get("version"):
        v[impl.get("package") or "implementation"] = impl["version"]
    try:
        from importlib import metadata

        for name in ("keras", "keras-hub"):
            v.setdefault(name, metadata.version(name))
    except Exception:  # noqa: BLE001 - the table is still useful without them
        pass
    keep = ("keras-hub", "keras", "easydel", "jax", "jaxlib", "transformers", "torch", "numpy")
    return ", ".join(f"{k} {v[k]}" for k in keep if v.get(k))


def markdown(documents: list[dict], diagnosed: list[dict], commands: dict[str, str] | None = None) -> str:
    lines = ["| factory | dtype | checks run | passed | failed | not checked | first failing tensor | diagnosis |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows(documents, diagnosed):
        lines.append(f"| `{row['factory'].rpartition(':')[2]}` | {row['dtype']} | {row['run']} | {row['passed']} | "
                     f"{row['failed']} | {row['not_checked']} | {row['first_failing'] or 'none'} | "
                     f"{row['diagnosis']} |")
    lines.append("")
    lines.append(f"Versions: {versions(documents)}.")
    for document in documents:
        env = document["environment"]
        outcomes: dict[str, int] = {}
        for test in document.get("tests", []):
            outcomes[test["outcome"]] = outcomes.get(test["outcome"], 0) + 1
        reasons: dict[str, int] = {}
        for entry in document.get("not_checked", []):
            reason = re.sub(r"\(.*", "", entry["reason"]).strip().removeprefix("not checked: ")
            reasons[reason] = reasons.get(reason, 0) + 1
        lines.append(f"- `{_factory(document)}`: tests {dict(sorted(outcomes.items()))}, wall time "
                     f"{round(env.get('wall_time_s') or 0)} s, exit status {document.get('exitstatus')}"
                     + (f"; `{commands[_factory(document)]}`" if commands and _factory(document) in commands else ""))
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            lines.append(f"  - {count} not checked: {reason}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m parity.scoreboard",
                                     description="Print the scoreboard of docs/public-implementations.md "
                                                 "(Markdown) from the parity JSON of whole-suite runs, one row per "
                                                 "factory and dtype; keras is not needed.")
    parser.add_argument("json", nargs="+", type=Path, help="parity JSON of whole-suite runs, one per factory")
    parser.add_argument("--diagnoses", action="append", type=Path, default=[],
                        help="parity JSON whose diagnosed records explain the first failures (the ecosystem run)")
    parser.add_argument("--json-out", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    try:
        documents = [read_json(p, "a --parity-json document", ("environment", "records")) for p in args.json]
        diagnoses = [read_json(p, "a --parity-json document", ("records",)) for p in args.diagnoses]
    except InputFileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    diagnosed = [r for document in diagnoses for r in document["records"] if r.get("diagnosis")]
    print(markdown(documents, diagnosed))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows(documents, diagnosed), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
