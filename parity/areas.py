"""A run's scope and its scorecard per area, for the report's first screen and the terminal summary.

The areas are the seven things a tensor-parallel Llama can get right or wrong on its own. Which tests belong to
which area is data, in this one place: a test's area is that of its function (`module::function`), else of its
module; a record's is its test's, else (a test outside the battery) that of its component. A test or record
that none of these name falls in "other". tests/test_report.py checks that every battery module is named here.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

NUMERICS, COMMUNICATION, SHARDING, DECODE = "numerics", "communication", "sharding", "decode"
GENERATION, CHECKPOINTS, TOKENIZER, OTHER = "generation", "checkpoints", "tokenizer", "other"
AREAS = (NUMERICS, COMMUNICATION, SHARDING, DECODE, GENERATION, CHECKPOINTS, TOKENIZER)

MODULE_AREAS = {  # battery module -> area (its file name under conformance/)
    "test_8b_width.py": NUMERICS, "test_attention.py": NUMERICS, "test_block.py": NUMERICS,
    "test_build_invariance.py": NUMERICS, "test_dtype.py": NUMERICS, "test_embedding.py": NUMERICS,
    "test_impl.py": NUMERICS, "test_logits.py": NUMERICS, "test_metamorphic.py": NUMERICS, "test_mlp.py": NUMERICS,
    "test_position.py": NUMERICS, "test_properties.py": NUMERICS, "test_real_model.py": NUMERICS,
    "test_references.py": NUMERICS, "test_rmsnorm.py": NUMERICS, "test_rope.py": NUMERICS,
    "test_ecosystem.py": NUMERICS, "test_ecosystem_easydel.py": NUMERICS, "test_ecosystem_penzai.py": NUMERICS,
    "test_ecosystem_torchax.py": NUMERICS,
    "test_communication.py": COMMUNICATION,
    "test_sharding.py": SHARDING, "test_tp_invariance.py": SHARDING, "test_multihost.py": SHARDING,
    "test_kv_cache.py": DECODE,
    "test_generation.py": GENERATION, "test_stop_tokens.py": GENERATION,
    "test_checkpoints.py": CHECKPOINTS, "test_checkpoint_handoff.py": CHECKPOINTS,
    "test_config_crosscheck.py": CHECKPOINTS, "test_published_configs.py": CHECKPOINTS,
    "test_tokenizer.py": TOKENIZER,
}

FUNCTION_AREAS = {  # tests whose module's area is not theirs
    "test_impl.py::test_impl_decode": DECODE,
    "test_metamorphic.py::test_meshes_agree_with_single_chip": SHARDING,
    "test_metamorphic.py::test_chunked_prefill_equals_one_prefill": DECODE,
    "test_build_invariance.py::test_decode_logits_do_not_depend_on_cache_length": DECODE,
    "test_real_model.py::test_real_decode_equals_full_forward": DECODE,
    "test_real_model.py::test_real_mesh_invariance": SHARDING,
    "test_real_model.py::test_the_installed_gguf_is_the_pinned_file": CHECKPOINTS,
    "test_real_model.py::test_a_bad_gguf_stops_with_one_line_naming_it": CHECKPOINTS,
    "test_real_model.py::test_a_cached_config_that_disagrees_with_the_gguf_metadata_stops": CHECKPOINTS,
    "test_real_model.py::test_a_failed_conversion_leaves_nothing_half_written": CHECKPOINTS,
    "test_real_model.py::test_a_conversion_that_finds_another_processs_result_keeps_it": CHECKPOINTS,
    "test_ecosystem_penzai.py::test_decode_matches_hf_without_rope_scaling": DECODE,
    "test_ecosystem_torchax.py::test_decode_matches_hf_at_float32": DECODE,
    "test_ecosystem_torchax.py::test_decode_of_a_left_padded_batch_matches_hf": DECODE,
}

COMPONENT_AREAS = {  # for records of tests outside the battery
    **dict.fromkeys(("embedding", "rmsnorm", "rope", "attention", "mlp", "block", "head", "logits", "intermediate",
                     "property", "batch_invariance", "rope_relative", "position_shift", "dtype", "golden",
                     "position", "position_drift", "build_invariance"), NUMERICS),
    "communication": COMMUNICATION, "sharding": SHARDING, "tp_invariance": SHARDING,
    "kv_cache": DECODE, "chunked_prefill": DECODE, "generation": GENERATION, "tokenizer": TOKENIZER,
}

FAIL, PASS, NOT_CHECKED, NOT_RUN = "fail", "pass", "not checked", "not run"
_BAD = ("failed", "error")
_OUTCOMES = ("passed", "failed", "error", "xpassed", "xfailed", "skipped")


def module_of(nodeid: str) -> str:
    """The module path of a test id: 'conformance/test_mlp.py' of 'conformance/test_mlp.py::test_mlp[...]'."""
    return nodeid.split("::", 1)[0]


def _file_name(path: str) -> str:
    return path.replace("\\", "/").rsplit("/", 1)[-1]


def area_of_test(nodeid: str) -> str | None:
    """The area of a test id from its function or module, None when neither is named here."""
    module, _, rest = nodeid.partition("::")
    function = rest.split("[", 1)[0].split("::")[-1]
    name = _file_name(module)
    return FUNCTION_AREAS.get(f"{name}::{function}") or MODULE_AREAS.get(name)


def record_area(record: Mapping[str, Any]) -> str:
    """A record's (or not-checked entry's) area: its test's, else its component's, else 'other'."""
    return area_of_test(record["test"]) or COMPONENT_AREAS.get(record.get("component") or "", OTHER)


def in_battery(module: str, battery: Iterable[str]) -> str | None:
    """The battery module (e.g. 'conformance/test_mlp.py') a test's module path is, matched by its last two parts
    so a run from an installed copy ('.../site-packages/conformance/test_mlp.py') still matches."""
    tail = "/".join(module.replace("\\", "/").split("/")[-2:])
    return next((b for b in battery if "/".join(b.split("/")[-2:]) == tail), None)


def scope(environments: Sequence[Mapping[str, Any]], tests: Sequence[Mapping[str, Any]],
          records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the runs covered: their modules against the battery's (when every run recorded it), meshes, dtypes,
    references (the runs' option lists when every run recorded them, else those of the records), tolerance
    profile, the -m / -k selection, a planted bug and a checkpoint directory when given. A battery module that did
    not run and that every run's -m leaves out by its module marks (`battery_deselected`) is outside the selection,
    not a part the run left out."""
    environments = list(environments) or [{}]
    modules = list(dict.fromkeys(module_of(t["nodeid"]) for t in tests))

    def recorded(key: str) -> list[str] | None:
        if not all(env.get(key) for env in environments):
            return None
        return list(dict.fromkeys(str(v) for env in environments for v in env[key]))

    def given(key: str) -> list[str]:
        return list(dict.fromkeys(str(env[key]) for env in environments if env.get(key)))

    def chosen(key: str, field: str) -> list[str]:
        return recorded(key) or sorted({str(r[field]) for r in records if r.get(field) is not None})

    battery = recorded("battery") or []
    ran = [b for b in battery if any(in_battery(m, [b]) for m in modules)]
    left_out = [env.get("battery_deselected") or {} for env in environments]
    deselected = {b: left_out[0][b] for b in battery if b not in ran and all(b in each for each in left_out)}
    not_run = [b for b in battery if b not in ran and b not in deselected]
    selections = [env.get("selection") or {} for env in environments]
    return {
        "modules": modules, "battery": battery, "ran": ran, "not_run": not_run, "deselected": deselected,
        "selected": [b for b in battery if b not in deselected],
        "deselected_marks": sorted({mark for marks in deselected.values() for mark in marks}),
        "outside": [m for m in modules if not in_battery(m, battery)] if battery else [],
        "partial": bool(not_run), "known": bool(battery),
        "meshes": chosen("meshes", "mesh"), "dtypes": chosen("dtypes", "dtype"),
        "references": chosen("references", "reference"),
        "options_recorded": all(recorded(k) for k in ("meshes", "dtypes", "references")),
        "profile": ", ".join(given("tolerance_profile")) or None,
        "markexpr": ", ".join(dict.fromkeys(s["markexpr"] for s in selections if s.get("markexpr"))) or None,
        "keyword": ", ".join(dict.fromkeys(s["keyword"] for s in selections if s.get("keyword"))) or None,
        "mutant": ", ".join(given("mutant")) or None, "checkpoint": ", ".join(given("checkpoint_dir")) or None,
    }


def scorecard(tests: Sequence[Mapping[str, Any]], records: Sequence[Mapping[str, Any]],
              not_checked: Sequence[Mapping[str, Any]], battery: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One row per area (and 'other' when anything falls there): its status and counts.

    fail: a test of the area failed or errored, or one of its records failed (not one a passing test expects);
    pass: otherwise, when a test of it passed; not checked: nothing passed, but the implementation lacked what
    some of its tests need; not run: no test of the area ran, or all of them were skipped.
    `records` carry their outcome ('pass', 'fail', 'expected fail') in `_outcome`.
    """
    areas: dict[str, dict[str, Any]] = {a: _empty(a) for a in AREAS}
    for test in tests:
        row = areas.setdefault(area_of_test(test["nodeid"]) or _test_area_by_records(test, records), _empty(OTHER))
        row["tests"][test["outcome"]] += 1
        row["modules"].add(module_of(test["nodeid"]))
    for record in records:
        row = areas.setdefault(record_area(record), _empty(OTHER))
        row["records"][record["_outcome"]] += 1
    for entry in not_checked:
        row = areas.setdefault(record_area(entry), _empty(OTHER))
        row["not_checked"].add(entry["test"])
    for name, row in areas.items():
        mine = [b for b in battery if MODULE_AREAS.get(_file_name(b)) == name]
        row["battery_modules"] = len(mine)
        row["modules_ran"] = sum(any(in_battery(m, [b]) for m in row["modules"]) for b in mine)
        row["status"] = _status(row)
    return [_finished(row) for row in areas.values()]


def _empty(area: str) -> dict[str, Any]:
    return {"area": area, "tests": Counter(), "records": Counter(), "not_checked": set(), "modules": set()}


def _test_area_by_records(test: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> str:
    """A test outside the battery takes the area of its first record's component."""
    first = next((r for r in records if r["test"] == test["nodeid"]), None)
    return record_area(first) if first else OTHER


def _status(row: Mapping[str, Any]) -> str:
    tests, records = row["tests"], row["records"]
    if any(tests[o] for o in _BAD) or records["fail"]:
        return FAIL
    if tests["passed"] or tests["xfailed"] or tests["xpassed"] or records["pass"]:
        return PASS
    return NOT_CHECKED if row["not_checked"] else NOT_RUN


def _finished(row: dict[str, Any]) -> dict[str, Any]:
    tests = row["tests"]
    return {"area": row["area"], "status": row["status"], "tests": sum(tests.values()),
            "by_outcome": [(o, tests[o]) for o in _OUTCOMES if tests[o]], "records": sum(row["records"].values()),
            "records_failed": row["records"]["fail"], "not_checked": len(row["not_checked"]),
            "modules": sorted(row["modules"]), "battery_modules": row["battery_modules"],
            "modules_ran": row["modules_ran"]}


def area_detail(row: Mapping[str, Any]) -> str:
    """What an area's status rests on: '12 tests: 11 passed, 1 failed · 40 records, 2 fail · 3 of 16 modules'."""
    if not row["tests"] and not row["records"]:
        modules = row["battery_modules"]
        return "no test of this area ran" + (f" · 0 of {_count(modules, 'module')}" if modules else "")
    outcomes = [f"{count} {outcome}" for outcome, count in row["by_outcome"]]
    parts = [_count(row["tests"], "test") + (": " + ", ".join(outcomes) if outcomes else "")]
    if row["records"]:
        parts.append(_count(row["records"], "record") + (f", {row['records_failed']} fail" if row["records_failed"]
                                                          else ""))
    if row["not_checked"]:
        parts.append(_count(row["not_checked"], "test") + " not checked")
    if row["battery_modules"]:
        parts.append(f"{row['modules_ran']} of {_count(row['battery_modules'], 'module')}")
    return " · ".join(parts)


def _count(count: int, word: str) -> str:
    return f"{count} {word}" + ("" if count == 1 else "s")


def scorecard_line(rows: Sequence[Mapping[str, Any]]) -> str:
    """'numerics pass · communication not run · ...', the scorecard in one line for the terminal."""
    return " · ".join(f"{row['area']} {row['status']}" for row in rows)
