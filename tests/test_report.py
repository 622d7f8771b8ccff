"""The HTML parity report: what the generated file contains, section by section, and that the plugin writes it
under pytest-xdist even when tests fail or error.

`sample_document()` builds a --parity-json document from records made by the real `assert_parity` (so their
shape is the plugin's), covering every case the page must show: passes, failures, a NaN, a planted bug caught
by its test, layered records with noise_ratio, logits, a generation record with token streams, and tests that
error, skip and xfail. The browser test renders the same document. (No argument here may be named `mesh`,
`dtype` or `reference`: the repo conftest parametrizes those.)
"""
from __future__ import annotations

import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conformance.inner_suite import INNER_CONFTEST
from conformance.plugin import battery_modules
from parity import areas, report_cli
from parity import report as pr
from parity.baseline import GateResult, Regression
from parity.check import RECORD_KEY, record_token_ids
from parity.schema import validate
from tests.report_samples import (
    BATTERY,
    DRAWN_MESHES,
    ENV_PACKAGES,
    FAILING,
    GEN,
    IMPLEMENTATION,
    LAYERED,
    LONG,
    NAN,
    PLANTED,
    REPO,
    SECTIONS,
    TOKENS_IMPL,
    TOKENS_REF,
    bound,
    sample_document,
    sample_records,
    scaled,
    scope_of,
    stand_in,
)

pytest_plugins = ["pytester"]


VOID = {"meta", "br", "input", "link", "img", "hr", "col", "source", "wbr", "area", "base", "embed", "track"}


class Node:
    def __init__(self, tag: str, attrs: dict, parent: "Node | None"):
        self.tag, self.attrs, self.parent, self.children = tag, attrs, parent, []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def iter(self):
        for child in self.children:
            if isinstance(child, Node):
                yield child
                yield from child.iter()

    def all(self, tag: str | None = None, cls: str | None = None, **attrs) -> list["Node"]:
        return [n for n in self.iter() if (tag is None or n.tag == tag) and (cls is None or cls in n.classes())
                and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())]

    def one(self, tag: str | None = None, cls: str | None = None, **attrs) -> "Node":
        found = self.all(tag, cls, **attrs)
        assert len(found) == 1, f"expected one <{tag} class={cls} {attrs}>, found {len(found)}"
        return found[0]


class _Builder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = self.node = Node("#document", {}, None)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.node)
        self.node.children.append(node)
        if tag not in VOID:
            self.node = node

    def handle_startendtag(self, tag, attrs):
        self.node.children.append(Node(tag, {k: v or "" for k, v in attrs}, self.node))

    def handle_endtag(self, tag):
        node = self.node
        while node is not None and node.tag != tag:
            node = node.parent
        assert node is not None, f"stray </{tag}>"
        self.node = node.parent

    def handle_data(self, data):
        self.node.children.append(data)


def parse(html: str) -> Node:
    builder = _Builder()
    builder.feed(html)
    builder.close()
    assert builder.node is builder.root, f"unclosed <{builder.node.tag}>"
    return builder.root


@pytest.fixture(scope="module")
def document():
    return sample_document()


@pytest.fixture(scope="module")
def page(document):
    return pr.render(document)


@pytest.fixture(scope="module")
def dom(page):
    return parse(page)


def squash(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


# ---- content ---------------------------------------------------------------------------------------------------

def test_sections_come_in_the_issue_order(dom):
    assert [n.attrs["id"] for n in dom.all("section")] == SECTIONS


def test_page_is_self_contained(page, dom):
    """Nothing is fetched: no external resource reference, and a CSP that forbids any network access."""
    assert not dom.all("link") and not dom.all("img") and not dom.all("iframe")
    assert all("src" not in s.attrs for s in dom.all("script"))
    for node in dom.iter():
        for attr in ("href", "src", "xlink:href"):
            value = node.attrs.get(attr)
            assert value is None or value.startswith(("#", "data:")), f"<{node.tag} {attr}={value!r}>"
    assert "@import" not in page and not re.search(r"url\(\s*['\"]?(?!#|data:)", page)
    csp = dom.one("meta", http_equiv="Content-Security-Policy").attrs["content"]
    assert "default-src 'none'" in csp
    assert dom.one("head").one("style").text().strip() and dom.one("script").text().strip()


def _records_of(document, test):
    return [r for r in document["records"] if r["test"] == test]


def test_verdict_counts_and_every_problem_with_its_message(dom, document):
    verdict = dom.one("div", cls="verdict")
    assert verdict.attrs["data-verdict"] == "FAIL" and "fail" in verdict.classes()
    head = squash(verdict.text())
    by_outcome = {o: sum(t["outcome"] == o for t in document["tests"]) for o in pr.OUTCOME_ORDER}
    assert by_outcome == {"passed": 19, "failed": 3, "error": 1, "xpassed": 0, "xfailed": 1, "skipped": 2}
    assert f"{len(document['tests'])} tests: 19 passed, 3 failed, 1 error, 1 xfailed, 2 skipped" in head
    assert "pytest exit status 1" in head
    counts = squash(dom.one("table", cls="counts").text())
    failing = sum(not r["passed"] for r in document["records"])
    assert f"{len(document['records']) - failing} pass" in counts
    assert "4 fail" in counts and "2 expected fail" in counts  # planted bugs are not failures of the run
    assert "2 not checked" in counts
    problems = {li.attrs["data-nodeid"]: squash(li.text()) for li in dom.one("ul", cls="problems").all("li")
                if "data-nodeid" in li.attrs}
    bad = {t["nodeid"]: t for t in document["tests"] if t["outcome"] in ("failed", "error")}
    assert list(problems) == list(bad)  # in run order
    for nodeid, test in bad.items():
        assert test["outcome"] in problems[nodeid] and squash(test["message"]) in problems[nodeid]
    quiet = squash(dom.one("ul", cls="quiet").text())
    assert "needs -m slow" in quiet and "known gap" in quiet


def test_title_and_banner_name_the_implementation_under_test(dom):
    assert squash(dom.one("title").text()) == (
        "Parity report: FAIL · tp_llama.adapter:TPLlamaAdapter (tp-llama-conformance 0.4.0)")
    assert "tp_llama.adapter:TPLlamaAdapter (tp-llama-conformance 0.4.0)" in squash(dom.one("h1").text())
    impl = squash(dom.one("div", cls="verdict").one("span", cls="impl").text())
    assert impl == "implementation under test: tp_llama.adapter:TPLlamaAdapter · package tp-llama-conformance 0.4.0"


@pytest.mark.parametrize("environment, label", [
    ({"implementation": {"factory": "my.pkg:Adapter", "package": "my-pkg", "version": None}},
     "my.pkg:Adapter (my-pkg)"),
    ({"implementation": {"factory": "tp_llama.adapter:TPLlamaAdapter", "package": "tp_llama", "version": None}},
     "tp_llama.adapter:TPLlamaAdapter"),  # the built-in: no version recorded, no package beyond its own module
    ({"implementation": "CPython", "impl": "examples.simple_llama.adapter:SimpleLlamaAdapter"},  # older files
     "examples.simple_llama.adapter:SimpleLlamaAdapter"),
    ({}, "implementation not recorded"),
])
def test_implementation_is_read_from_either_environment_field(environment, label):
    assert pr.implementation_label(pr.implementation_of(environment)) == label
    page = pr.render({"environment": environment, "records": [], "tests": []})
    html = parse(page)
    assert squash(html.one("title").text()) == f"Parity report: PASS · {label}"
    assert "version not recorded" not in page  # a version that is not recorded is not shown
    if environment.get("implementation") == "CPython":
        env = html.one("section", id="environment")
        rows = {squash(tr.one("th").text()): squash(tr.one("td").text()) for tr in env.all("table")[0].all("tr")}
        assert rows["implementation under test"] == label and rows["python"] == "CPython"


def test_failures_open_on_the_first_failing_tensor_of_each_test_with_its_diagnosis(dom, document):
    """The failure-first view comes before the matrix and names, per failing test, the first record that failed
    (computation order: where the bug enters), how many failed, and that record's probable cause."""
    sections = dom.one("section", id="verdict")
    failures = {li.attrs["data-nodeid"]: li for li in sections.one("div", id="failures").all("li")
                if "data-nodeid" in li.attrs}
    long = failures[LONG]
    first = squash(long.one("div", cls="first").text())
    limit = bound("intermediate", "bfloat16", "rel_l2", "meta", "1x4")
    assert first.startswith("first failing tensor: layers.1.q_rope (intermediate, layer 1) · meta · bfloat16 · 1x4:")
    assert f"rel_l2 {5 * limit:.3e} > {limit:.3e} (5×)" in first
    assert "failing records: 2 of 3" in first
    assert long.one("button", cls="show-records").attrs["data-test"] == LONG
    diagnosis = long.one("div", cls="diagnosis")
    assert "known" in diagnosis.classes()
    assert squash(diagnosis.one("b").text()) == ("probable cause: Llama 3.1 RoPE scaling not applied - matches "
                                                 "rel_l2 2.1e-07")
    hypotheses = [[squash(td.text()) for td in tr.all("td")] for tr in diagnosis.one("tbody").all("tr")]
    assert [h[:3] for h in hypotheses] == [["rope_unscaled", "2.1e-07", "yes"], ["rope_bf16_phase", "0.31", "no"],
                                           ["gate_up_swapped", "0.97", "no"]]  # the match first, then by residual
    mlp = squash(failures[FAILING].one("div", cls="diagnosis").text())
    assert mlp.startswith("probable cause: w1 and w3 swapped in the MLP")
    assert not failures[NAN].all("div", cls="diagnosis")  # not diagnosed: nothing is made up
    assert "actual has 1 NaN/Inf of 2" in squash(failures[NAN].one("div", cls="first").text())
    error = failures["conformance/test_block.py::test_block[meta-float32-1x4]"]
    assert not error.all("div", cls="first") and "fixture broke" in error.one("pre").text()  # no record: message


def test_probable_causes_count_failing_records_and_tests(dom, document):
    rows = {tr.attrs["data-cause"]: [squash(c.text()) for c in tr.all("td")]
            for tr in dom.one("table", cls="causes").one("tbody").all("tr")}
    assert list(rows) == ["gate_up_swapped", "rope_unscaled", "no known cause", "not diagnosed"]
    assert rows["rope_unscaled"][:3] == ["1", "1", "Llama 3.1 RoPE frequency scaling not applied"]
    assert rows["gate_up_swapped"][:2] == ["1", "1"]
    assert rows["no known cause"][:2] == ["1", "1"] and rows["not diagnosed"][:2] == ["1", "1"]
    failing = [r for r in document["records"] if not r["passed"] and r["test"] != PLANTED]
    assert sum(int(v[0]) for v in rows.values()) == len(failing) == 4
    # several records of one cause across tests: counted once per record, once per test
    twice = [dict(r) for r in _records_of(document, LONG)]
    twice[2]["diagnosis"] = twice[1]["diagnosis"]
    again = [{**r, "test": "t.py::again"} for r in twice]
    causes = pr.probable_causes(twice + again, {LONG: "failed", "t.py::again": "failed"})
    assert [(c["cause"], c["records"], c["tests"]) for c in causes] == [("rope_unscaled", 4, 2)]


def test_a_passing_run_shows_no_causes_and_no_failures():
    html = parse(pr.render({"environment": {}, "records": [], "tests": [{"nodeid": "a", "outcome": "passed",
                                                                         "message": None}]}))
    assert not html.all(id="causes") and not html.all(id="failures")


def test_failing_records_without_any_diagnosis_say_so():
    record = {"test": "t.py::x", "component": "mlp", "dtype": "float32", "passed": False, "metrics": {},
              "bounds": {}, "error": "shape mismatch: actual (2,) vs expected (3,)", "mesh": "1x1"}
    html = parse(pr.render({"environment": {}, "records": [record],
                            "tests": [{"nodeid": "t.py::x", "outcome": "failed", "message": None}]}))
    assert "did not diagnose its failures" in squash(html.one(id="causes").text())
    assert "shape mismatch" in squash(html.one(id="failures").one("div", cls="first").text())


def test_not_checked_tensors_are_counted_with_their_reasons(dom, document):
    block = dom.one("div", id="not-checked")
    assert squash(block.one("h3").text()) == "Not checked: 2 named tensors in 1 test"
    (reason,) = block.one("ul").all("li")
    assert squash(reason.text()) == f"2 tensors in 1 test (intermediate): {document['not_checked'][0]['reason']}"


def test_messages_are_escaped(page):
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def _cells(dom) -> dict[tuple[str, str, str, str], Node]:
    return {(c.attrs["data-component"], c.attrs["data-reference"], c.attrs["data-dtype"], c.attrs["data-mesh"]): c
            for table in dom.all("table", cls="matrix") for c in table.all("td", cls="cell")}


def _column(record) -> str:
    return "drawn" if record["mesh"] in DRAWN_MESHES else str(record["mesh"]).replace("None", "none")


def test_matrix_cells_colour_and_worst_margin(dom, document):
    cells = _cells(dom)
    expected_keys = {(r["component"], r["reference"], r["dtype"], _column(r)) for r in document["records"]}
    assert cells.keys() == expected_keys
    fail = cells["mlp", "meta", "float32", "1x4"]
    assert "fail" in fail.classes() and squash(fail.one("b").text()) == "3×"  # rel_l2 = 3 x its bound
    assert squash(fail.one("span").text()) == "1 fail" and "rel_l2" in fail.attrs["title"]
    ok = cells["mlp", "meta", "float32", "1x1"]
    assert "pass" in ok.classes() and squash(ok.one("b").text()) == "0.5×" and squash(ok.one("span").text()) == "rel_l2"
    assert squash(cells["rope", "meta", "float32", "1x4"].one("b").text()) == "∞"  # NaN
    mixed = cells["intermediate", "meta", "float32", "1x1"]
    assert "pass" in mixed.classes() and "1 failing as expected" in mixed.attrs["title"]
    assert squash(mixed.one("b").text()) != "∞" and float(squash(mixed.one("b").text())[:-1]) < 1
    planted = cells["attention", "hf", "float32", "1x4"]
    assert "expected-fail" in planted.classes() and "1 failing as expected" in planted.attrs["title"]
    assert squash(planted.one("b").text()) == "caught" and squash(planted.one("span").text()) == "1 caught"
    worst = max(r["metrics"][m] / r["bounds"][m] for r in document["records"] for m in ("rel_l2", "noise_ratio")
                if r["component"] == "intermediate" and r["reference"] == "hf" and r["dtype"] == "bfloat16"
                and r["mesh"] == "1x4")
    assert worst == pytest.approx(0.35)  # noise_ratio at layer 3: 0.2 + 0.05 * 3 of its bound
    assert squash(cells["intermediate", "hf", "bfloat16", "1x4"].one("b").text()) == f"{worst:.2g}×"
    long = cells["intermediate", "meta", "bfloat16", "1x4"]
    assert "fail" in long.classes() and squash(long.one("span").text()) == "2 fail"


def test_one_matrix_per_dtype_with_the_same_rows(dom, document):
    """float32 and bfloat16 get a table each (side by side or stacked, see the browser test), with the same rows
    in the same order so that tables side by side line up."""
    tables = dom.all("table", cls="matrix")
    assert [squash(t.one("caption").text()) for t in tables] == ["float32", "bfloat16"]
    assert [t.attrs["data-dtype"] for t in tables] == ["float32", "bfloat16"]
    rows = [[tuple(squash(th.text()) for th in tr.all("th")) for tr in t.one("tbody").all("tr")] for t in tables]
    assert rows[0] == rows[1]
    assert rows[0][0] == ("rope", "meta") and ("property", "meta") in rows[0]
    assert len(rows[0]) == len({(r["component"], r["reference"]) for r in document["records"]})
    for table in tables:
        header = [squash(th.text()) for th in table.one("thead").all("th")]
        assert header == ["component", "reference", "1x1", "1x2", "1x4", "1x8", "2x4", "none", "drawn"]
    assert tables[0].all("td", cls="empty"), "combinations without records show as empty"


def test_meshes_only_property_tests_drew_fold_into_one_drawn_column(dom, document):
    cells = _cells(dom)
    for dt in ("float32", "bfloat16"):
        drawn = [r for r in document["records"] if r["dtype"] == dt and r["mesh"] in DRAWN_MESHES]
        assert {(r["component"], r["reference"]) for r in drawn} == {("property", "meta"), ("tp_invariance", "1x1")}
        cell = cells["property", "meta", dt, "drawn"]
        mine = [r for r in drawn if r["component"] == "property"]
        assert cell.attrs["title"].startswith(f"{len(mine)} records, 0 failing")
        assert "drawn meshes: 2x1 (1), 2x2 (1), 4x1 (1), 4x2 (1), 8x1 (1)" in cell.attrs["title"]
        worst = max(r["metrics"]["noise_ratio"] / r["bounds"]["noise_ratio"] for r in mine)
        assert squash(cell.one("b").text()) == f"{worst:.2g}×"
        # a property record on a mesh other tests chose stays in that mesh's column
        assert "1 records" in cells["property", "meta", dt, "1x4"].attrs["title"]
        assert "drawn meshes: 2x2 (1)" in cells["tp_invariance", "1x1", dt, "drawn"].attrs["title"]
    note = squash(dom.one("p", cls="drawn-note").text())
    assert "(2x1, 2x2, 4x1, 4x2, 8x1)" in note
    drawn_header = dom.all("table", cls="matrix")[0].one("th", cls="drawn")
    assert drawn_header.attrs["title"] == "meshes only property tests drew: 2x1, 2x2, 4x1, 4x2, 8x1"


def test_drawn_meshes_are_decided_from_the_data():
    def rec(test, mesh):
        return {"test": test, "mesh": mesh}

    records = [rec("t.py::test_a[meta-float32-1x4]", "1x4"), rec("t.py::test_prop[rmsnorm]", "1x4"),
               rec("t.py::test_prop[rmsnorm]", "2x2"), rec("t.py::test_prop", "4x1"),
               rec("t.py::test_b[11x4-float32]", "1x4"), rec("t.py::test_c[2x4]", "2x4"), rec("t.py::g", None)]
    assert pr.drawn_meshes(records) == {"2x2", "4x1"}
    assert pr.drawn_meshes(records, [{"meshes": ["4x1"]}]) == {"2x2"}  # the run's --mesh list, when recorded
    assert pr.mesh_named_by_test("t.py::test_a[meta-float32-1x4-layer0]", "1x4")
    assert not pr.mesh_named_by_test("t.py::test_a[meta-float32-11x4]", "1x4")
    assert not pr.mesh_named_by_test("t.py::test_1x4_shape", "1x4")  # only the parameters count
    assert pr.drawn_meshes([rec("t.py::test_prop[x]", "2x2")]) == {"2x2"}  # a run of property tests only


def test_depth_chart_has_one_line_per_reference_and_dtype(dom, document):
    svg = dom.one("figure", cls="chart").one("svg")
    for metric in ("rel_l2", "noise_ratio"):
        for ref in ("meta", "hf"):
            for dt in ("float32", "bfloat16"):
                line = svg.one("g", id=f"depth-{metric}-{ref}-{dt}")
                assert line.all("path"), f"line {metric} {ref} {dt} has no path"
    assert "rel_l2 per layer" in svg.text() and "noise_ratio per layer" in svg.text()
    rows = {tuple(squash(td.text()) for td in tr.all("td")[:3]): squash(tr.all("td")[3].text())
            for tr in dom.one("table", cls="depth-data").one("tbody").all("tr")}
    layered = [r for r in document["records"] if r["layer"] is not None and r["reference"] == "hf"
               and r["dtype"] == "float32"]
    worst3 = max(r["metrics"]["rel_l2"] for r in layered if r["layer"] == 3)  # the 1x4 mesh, 1.5x worse
    assert f"3: {worst3:.3e}" in rows["rel_l2", "hf", "float32"]
    meta3 = max(r["metrics"]["rel_l2"] for r in document["records"] if r["test"] == LAYERED and r["layer"] == 3
                and r["reference"] == "meta" and r["dtype"] == "float32")
    assert f"3: {meta3:.3e}" in rows["rel_l2", "meta", "float32"]  # the planted 0.5 at layer 3 is left out
    assert len(rows) == 8


def test_records_table_lists_every_record_failing_first_with_scope_bounds_and_cause(dom, document):
    body = dom.one("table", id="record-table").one("tbody")
    rows = body.all("tr")
    outcomes = {t["nodeid"]: t["outcome"] for t in document["tests"]}
    in_order = sorted(document["records"], key=lambda r: pr.record_outcome(r, outcomes.get(r["test"])) != "fail")
    assert len(rows) == len(document["records"])
    assert [r.attrs["data-outcome"] for r in rows[:4]] == ["fail"] * 4
    for row, record in zip(rows, in_order):
        assert row.attrs["data-component"] == record["component"] and row.attrs["data-test"] == record["test"]
        assert row.attrs["data-reference"] == record["reference"] and row.attrs["data-mesh"] == str(
            record["mesh"]).replace("None", "none")
        assert record["test"] in row.text()
        mesh_cell = squash(row.all("td")[6].text())  # its own mesh, tagged when its test drew it
        assert mesh_cell == str(record["mesh"]).replace("None", "none") + (
            " drawn" if record["mesh"] in DRAWN_MESHES else "")
    failing = next(r for r in rows if r.attrs["data-outcome"] == "fail" and r.attrs["data-component"] == "mlp")
    failed_metric = squash(failing.one("span", cls="failed").text())
    limit = bound("mlp", "float32", "rel_l2")
    assert failed_metric == f"rel_l2 {3 * limit:.3e} ≤ {limit:.3e} 3×"
    cause = failing.one("td", cls="cause").one("span")
    assert squash(cause.text()) == "gate_up_swapped" and cause.attrs["title"].startswith("probable cause: w1 and w3")
    unknown = next(r for r in rows if "layers.1.block_out" in r.text() and r.attrs["data-test"] == LONG)
    assert squash(unknown.one("td", cls="cause").text()) == "no known cause"
    assert unknown.attrs["data-cause"] == "no known cause"
    nan_row = next(r for r in rows if r.attrs["data-component"] == "rope")
    assert "NaN/Inf" in nan_row.one("div", cls="error").text() and nan_row.attrs["data-outcome"] == "fail"
    assert squash(nan_row.one("td", cls="cause").text()) == ""  # not diagnosed
    planted = [r.attrs["data-outcome"] for r in rows if PLANTED in r.text()]
    assert planted == ["expected fail", "expected fail"]
    drawn = [r for r in rows if r.attrs.get("data-mesh-group") == "drawn"]
    assert sorted(r.attrs["data-mesh"] for r in drawn) == sorted(
        r["mesh"] for r in document["records"] if r["mesh"] in DRAWN_MESHES)


def test_filters_offer_every_value_of_each_field(dom, document):
    selects = {s.attrs["data-filter"]: [o.attrs["value"] for o in s.all("option")] for s in dom.all("select")}
    assert list(selects) == ["component", "reference", "dtype", "mesh", "outcome", "cause"]
    assert selects["dtype"] == ["", "float32", "bfloat16"]
    assert selects["mesh"] == ["", "1x1", "1x2", "2x1", "1x4", "2x2", "4x1", "1x8", "2x4", "4x2", "8x1", "none",
                               "drawn"]
    assert set(selects["component"][1:]) == {r["component"] for r in document["records"]}
    assert set(selects["outcome"][1:]) == {"pass", "fail", "expected fail"}
    assert set(selects["cause"][1:]) == {"gate_up_swapped", "rope_unscaled", "no known cause"}
    headers = dom.one("table", id="record-table").one("thead").all("th")
    assert {squash(h.text()) for h in headers if "data-sort" in h.attrs} >= {"component", "layer", "margin", "mesh",
                                                                           "probable cause"}


def test_generation_streams_side_by_side_with_divergence_and_topk(dom):
    cases = dom.one("section", id="generation").all("details", cls="generation")
    assert [GEN in c.text() for c in cases] == [True, False]  # streams that part come first
    parted, same = cases
    assert "open" not in parted.attrs and "open" not in same.attrs  # only failing records are unfolded
    assert "1 of 2 prompts part" in squash(parted.one("summary").text())
    assert "1 prompts, streams identical" in squash(same.one("summary").text())
    first, second = parted.all("div", cls="prompt")
    assert "first divergence at step 3" in squash(first.one("h4").text())
    assert "identical for 2 steps" in squash(second.one("h4").text())
    stream = first.one("table", cls="stream")
    assert [squash(th.text()) for th in stream.all("th")] == ["step", "tp_llama 1x4", "meta"]
    steps = stream.one("tbody").all("tr")
    assert [[squash(td.text()) for td in tr.all("td")] for tr in steps] == [
        [str(i), str(a), str(b)] for i, (a, b) in enumerate(zip(TOKENS_IMPL, TOKENS_REF))]
    assert [tr.attrs["class"] for tr in steps] == ["", "", "", "diverge", "after", "after"]
    topk = first.one("table", cls="topk")
    assert "step 3" in topk.one("caption").text()
    rows = [[squash(td.text()) for td in tr.all("td")] for tr in topk.one("tbody").all("tr")]
    assert rows == [["1", "7", "-0.6900", "8", "-0.6800"], ["2", "8", "-0.7000", "7", "-0.7100"],
                    ["3", "2", "-3.1000", "", ""]]
    marked = [squash(td.text()) for td in topk.all("td", cls="other-choice")]
    assert marked == ["8", "7"]  # each side's list marks the token the other side chose
    decoded = squash(first.one("dl", cls="decoded").text())
    assert "The cat cat sat on." in decoded and "The cat cat sits here." in decoded
    assert not second.all("table")  # identical streams: just their length


def test_long_streams_show_a_window_around_the_divergence():
    row = {"prompt": 0, "prompt_length": 3, "actual_tokens": list(range(500)),
           "expected_tokens": list(range(100)) + [0] * 400, "first_divergence": 100,
           "topk_actual": [[100, -0.1]], "topk_expected": [[0, -0.1]]}
    record = {"test": "t.py::g", "passed": False, "generation": {
        "case": "long", "start_pos": 0, "actual_engine": "a", "expected_engine": "b", "rows": [row]}}
    (case,) = pr.generation_cases([record], {"t.py::g": "failed"})
    (prompt,) = case["prompts"]
    assert [s["step"] for s in prompt["steps"]] == list(range(100 - pr.STEPS_BEFORE, 101 + pr.STEPS_AFTER))
    assert (prompt["hidden_before"], prompt["hidden_after"]) == (96, 500 - 109)
    html = pr.render({"environment": {}, "records": [{**record, "component": "generation", "reference": "b",
                                                      "dtype": "float32", "mesh": "1x1", "metrics": {},
                                                      "bounds": {}, "name": None, "layer": None, "error": None}],
                      "tests": [{"nodeid": "t.py::g", "outcome": "failed", "message": "m"}]})
    stream = parse(html).one("table", cls="stream")
    elided = [squash(tr.text()) for tr in stream.all("tr", cls="elided")]
    assert elided == ["steps 0 to 95: identical", "391 more steps"]
    assert "open" in parse(html).one("details", cls="generation").attrs  # a failing record opens itself


def test_sample_document_follows_the_json_schema(document):
    """The sample is what --parity-json writes, generation records included, so the report reads real shapes."""
    assert validate(document) == []


def test_environment_names_versions_devices_and_run_settings(dom):
    env = dom.one("section", id="environment")
    versions = {squash(tr.one("th").text()): squash(tr.one("td").text())
                for tr in env.one("table", cls="versions").all("tr") if tr.all("td")}
    for package in ENV_PACKAGES:
        assert versions[package] not in ("", "not installed")
    assert versions["pytest-xdist"] == "not installed"
    settings = {squash(tr.one("th").text()): squash(tr.one("td").text())
                for tr in env.all("table")[0].all("tr")}
    assert settings["implementation under test"] == "tp_llama.adapter:TPLlamaAdapter (tp-llama-conformance 0.4.0)"
    assert settings["python"] == "CPython 3.11.7"
    assert settings["devices"] == "8 x cpu (cpu)"
    assert settings["meshes in records"] == "1x1, 1x2, 1x4, 1x8, 2x4, none"
    assert settings["drawn meshes"] == "2x1, 2x2, 4x1, 4x2, 8x1"
    assert settings["tolerance profile"] == "default" and settings["seeds"] == "weights=0"
    assert settings["wall time"] == "123.4 s" and settings["platform"].startswith("Linux")
    assert settings["pytest exit status"] == "1"


def test_empty_run_still_renders_and_says_what_is_missing():
    html = pr.render({"environment": {}, "records": [], "tests": []})
    dom = parse(html)
    assert [n.attrs["id"] for n in dom.all("section")] == SECTIONS
    text = squash(dom.text())
    assert "No parity records in this run" in text and "no curve to draw" in text
    assert "No generation record" in text and "not recorded" in text
    assert dom.one("div", cls="verdict").attrs["data-verdict"] == "PASS"


def test_baseline_regressions_turn_the_verdict_red():
    gate = GateResult(path="fixtures/parity_baseline.json", compared=3,
                      regressions=[Regression("worsened", "t.py::x [mlp] reference=meta", "rel_l2 = 2e-06 > limit")])
    dom = parse(pr.render({"environment": {}, "records": [],
                           "tests": [{"nodeid": "t.py::x", "outcome": "passed", "message": None}]}, gate))
    assert dom.one("div", cls="verdict").attrs["data-verdict"] == "FAIL"
    assert "FAIL against fixtures/parity_baseline.json: 1 regressions" in squash(dom.one(id="gate").text())
    assert "t.py::x [mlp] reference=meta" in dom.one("ul", cls="regressions").text()


def test_tokenizer_records_get_a_matrix_row_and_fail_on_one_differing_id(document):
    """Tokenizer records, as conformance/test_tokenizer.py makes them (parity.check.record_token_ids), follow the
    JSON schema and get a matrix of their own with a tokenizer row; a planted differing id fails its cell and its
    row in the records table, which shows the id counts and where the ids part."""
    records = []
    for case, meta_ids, hf_ids in (("english", [791, 4062, 14198], [791, 4062, 14198]),
                                   ("emoji", [15571, 2683, 9], [15571, 2683, 0])):  # planted: one id differs
        request = stand_in(f"conformance/test_tokenizer.py::test_corpus_ids_match_meta[{case}]")
        record_token_ids(request, name=case, actual=[hf_ids], expected=[meta_ids], reference="meta")
        records += [value for key, value in request.node.user_properties if key == RECORD_KEY]
    tests = [{"nodeid": r["test"], "outcome": "passed" if r["passed"] else "failed", "message": None}
             for r in records]
    run = json.loads(json.dumps({"environment": document["environment"], "records": records, "tests": tests}))
    assert validate(run) == []
    dom = parse(pr.render(run))
    table = dom.one("table", cls="matrix")
    assert squash(table.one("caption").text()) == "tokenizer"
    (row,) = table.one("tbody").all("tr")
    assert tuple(squash(th.text()) for th in row.all("th")) == ("tokenizer", "meta")
    cell = row.one("td", cls="cell")
    assert "fail" in cell.classes() and squash(cell.one("span").text()) == "1 fail"
    assert cell.attrs["title"].startswith("2 records, 1 failing")
    failing, passing = dom.one("table", id="record-table").one("tbody").all("tr")
    assert (failing.attrs["data-outcome"], passing.attrs["data-outcome"]) == ("fail", "pass")
    assert "emoji" in failing.text() and "english" in passing.text()
    shown = squash(failing.text())
    assert "token_ids 3" in shown and "differing_ids 1" in shown and "first_difference 2" in shown
    assert squash(failing.one("div", cls="error").text()).startswith(
        "1 of 3 ids differ; input 0 of 1 differs from position 2")


# ---- the first screen: scope and scorecard ---------------------------------------------------------------------

def _scope_rows(dom) -> dict[str, str]:
    cells = [squash(c.text()) for tr in dom.one("table", cls="scope").all("tr") for c in tr.all()
             if c.tag in ("th", "td") and c.parent is tr]
    return dict(zip(cells[::2], cells[1::2]))


def test_scope_says_plainly_that_a_run_covered_part_of_the_battery(dom, document):
    ran = sorted({r["test"].split("::")[0] for r in document["records"]} | {t["nodeid"].split("::")[0]
                                                                           for t in document["tests"]})
    in_battery = [m for m in ran if m in BATTERY]
    assert len(in_battery) == 9 and len(BATTERY) > 9
    banner = squash(dom.one("div", cls="verdict").one("span", cls="scope-note").text())
    assert banner == f"on part of the battery: 9 of {len(BATTERY)} modules"
    scope = dom.one("div", id="scope")
    assert scope.attrs["data-scope"] == "partial"
    assert squash(scope.one("p", cls="coverage").text()) == (
        f"This run covered only part of the battery: 9 of its {len(BATTERY)} modules ran. "
        "Also 2 modules outside the battery.")
    rows = _scope_rows(dom)
    assert rows["modules that ran"].split() == [m.split("/")[-1] for m in in_battery]
    assert rows["outside the battery"].split() == ["conformance/test_mutations.py", "conformance/test_intermediate.py"]
    assert rows["battery modules not run"].startswith(f"{len(BATTERY) - 9} modules")
    assert (rows["meshes"], rows["dtypes"], rows["references"]) == ("1x1, 1x4", "float32, bfloat16", "meta, hf")
    assert rows["tolerance profile"] == "default" and rows["selection"] == '-m "not slow"'
    assert rows["--impl"] == IMPLEMENTATION["factory"]
    assert "planted bug (--mutant)" not in rows and "checkpoint (--checkpoint-dir)" not in rows


def _whole_run(environment, modules):
    """The page of a run with no records where one test of each module passed: only its scope is in question."""
    tests = [{"nodeid": f"{m}::test_x", "outcome": "passed", "message": None} for m in modules]
    return parse(pr.render({"environment": environment, "records": [], "tests": tests}))


def _whole_scope(dom, coverage: str) -> dict[str, str]:
    """The scope rows of a page that must read as a whole run: no banner note, no module left out."""
    assert dom.one("div", id="scope").attrs["data-scope"] == "whole"
    assert not dom.one("div", cls="verdict").all("span", cls="scope-note")
    assert squash(dom.one("p", cls="coverage").text()) == coverage
    rows = _scope_rows(dom)
    assert "battery modules not run" not in rows
    return rows


def test_a_run_of_every_battery_module_says_it_covered_the_whole_battery(document):
    environment = {**document["environment"], "mutant": "rope_unscaled", "checkpoint_dir": "/ckpt"}
    rows = _whole_scope(_whole_run(environment, BATTERY),
                        f"This run covered the whole battery: all {len(BATTERY)} modules ran.")
    assert rows["planted bug (--mutant)"] == "rope_unscaled" and rows["checkpoint (--checkpoint-dir)"] == "/ckpt"


def test_battery_modules_outside_the_marker_selection_are_not_a_partial_run(document):
    """The default -m leaves out the slow and ecosystem modules: a run of every other module covered all its
    selection takes; one module fewer is still a part, counted against the selection."""
    slow, ecosystem = BATTERY[0], BATTERY[1]
    environment = {**document["environment"], "battery_deselected": {slow: ["slow"], ecosystem: ["ecosystem"]}}
    ran = [m for m in BATTERY if m not in (slow, ecosystem)]
    rows = _whole_scope(_whole_run(environment, ran),
                        f"This run covered the whole battery its -m selection takes: all {len(ran)} modules ran.")
    assert rows["outside the -m selection"].startswith("2 modules, marked ecosystem, slow")
    dom = _whole_run(environment, ran[1:])
    banner = squash(dom.one("div", cls="verdict").one("span", cls="scope-note").text())
    assert banner == f"on part of the battery: {len(ran) - 1} of {len(ran)} modules its selection takes"
    assert _scope_rows(dom)["battery modules not run"].startswith("1 module")


def test_a_module_the_selection_leaves_out_but_that_ran_counts_as_run(document):
    """Module marks are an approximation of -m: a test of a marked module that ran (its own marks selected it)
    makes the module run, not outside the selection."""
    environment = {**document["environment"], "battery_deselected": {BATTERY[0]: ["slow"]}}
    tests = [{"nodeid": f"{m}::test_x", "outcome": "passed", "message": None} for m in BATTERY]
    covered = areas.scope([environment], tests, [])
    assert covered["deselected"] == {} and covered["ran"] == BATTERY and not covered["partial"]


def test_a_run_that_did_not_record_its_battery_says_its_coverage_is_unknown(document):
    """An older --parity-json: no battery, no option lists; the scope says so and shows what its records hold."""
    environment = {k: v for k, v in document["environment"].items()
                   if k not in ("battery", "meshes", "dtypes", "references", "selection")}
    dom = parse(pr.render({**document, "environment": environment}))
    assert dom.one("div", id="scope").attrs["data-scope"] == "unknown"
    banner = squash(dom.one("div", cls="verdict").one("span", cls="scope-note").text())
    assert banner == "its coverage of the battery is not recorded"
    assert "whether it covered all of them is unknown: 11 modules ran" in squash(dom.one("p", cls="coverage").text())
    rows = _scope_rows(dom)
    assert rows["references"] == "1x1, hf, meta"  # the records' references, not an option list
    assert "not recorded" in rows["options"] and "selection" not in rows


def _scorecard(dom) -> dict[str, tuple[str, str]]:
    return {tr.attrs["data-area"]: (tr.one("td").attrs["data-status"], squash(tr.one("td").one("small").text()))
            for tr in dom.one("table", id="scorecard").one("tbody").all("tr")}


def test_scorecard_gives_every_area_pass_fail_or_not_run(dom):
    card = _scorecard(dom)
    assert list(card) == list(areas.AREAS)
    assert {area: status for area, (status, _) in card.items()} == {
        "numerics": "fail", "communication": "not run", "sharding": "pass", "decode": "not run",
        "generation": "pass", "checkpoints": "not run", "tokenizer": "not run"}
    assert card["sharding"][1] == "9 tests: 9 passed · 10 records · 1 of 3 modules"
    assert card["numerics"][1].startswith("13 tests: 6 passed, 3 failed, 1 error, 1 xfailed, 2 skipped · 54 records, "
                                          "4 fail · 1 test not checked · 6 of ")
    assert card["communication"][1] == "no test of this area ran · 0 of 1 module"


def test_scorecard_says_not_checked_where_the_implementation_lacked_the_capability():
    """Decode's tests skipped as not checked; a failed communication test; a test outside the battery."""
    reason = "not checked: SimpleLlamaAdapter has no decode path (init_cache, step)"
    kv_cache = "conformance/test_kv_cache.py::test_prefill_plus_decode_equals_full_forward[1x1]"
    tests: list[dict[str, str | None]] = [
             {"nodeid": kv_cache, "outcome": "skipped", "message": reason},
             {"nodeid": "conformance/test_impl.py::test_impl_decode[meta-float32-1x4]", "outcome": "skipped",
              "message": reason},
             {"nodeid": "conformance/test_communication.py::test_x", "outcome": "failed", "message": "boom"},
             {"nodeid": "my_tests/test_mine.py::test_y", "outcome": "passed", "message": None}]
    not_checked = [{"test": t["nodeid"], "component": None, "name": None, "reason": reason} for t in tests[:2]]
    environment = {"battery": BATTERY}
    dom = parse(pr.render({"environment": environment, "records": [], "tests": tests, "not_checked": not_checked}))
    card = _scorecard(dom)
    assert card["decode"] == ("not checked", "2 tests: 2 skipped · 2 tests not checked · 1 of 1 module")
    assert card["communication"][0] == "fail" and card["numerics"][0] == "not run"
    assert card["other"] == ("pass", "1 test: 1 passed")  # outside the battery and without records


def test_scorecard_puts_one_column_per_implementation(tmp_path, document):
    other = {"environment": {"implementation": SIMPLE, "battery": BATTERY}, "exitstatus": 0, "records": [],
             "tests": [{"nodeid": "conformance/test_tokenizer.py::test_t", "outcome": "passed", "message": None}]}
    dom = parse(pr.render_runs([("a", document), ("b", other)]))
    table = dom.one("table", id="scorecard")
    assert [squash(th.text()) for th in table.one("thead").all("th")] == ["area", "tp-llama-conformance 0.4.0",
                                                                        "simple-llama 1.0"]
    tokenizer = table.one("tr", data_area="tokenizer")
    assert [td.attrs["data-status"] for td in tokenizer.all("td")] == ["not run", "pass"]


def test_every_battery_module_and_named_test_has_an_area():
    """The mapping cannot fall behind the battery: each conformance/test_*.py has an area, and each test named
    on its own still exists in its module."""
    assert BATTERY == battery_modules()
    names = {m.split("/")[-1] for m in BATTERY}
    assert names - set(areas.MODULE_AREAS) == set(), "give these modules an area in parity/areas.py"
    assert set(areas.MODULE_AREAS) - names == set(), "these modules in parity/areas.py are gone from the battery"
    assert set(areas.MODULE_AREAS.values()) == set(areas.AREAS)
    for key, area in areas.FUNCTION_AREAS.items():
        module, function = key.split("::")
        assert re.search(rf"^def {function}\(", (REPO / "conformance" / module).read_text(), re.M), key
        assert area in areas.AREAS and area != areas.MODULE_AREAS[module], key


def test_a_tests_area_comes_from_its_function_then_its_module_then_its_records_component():
    assert areas.area_of_test("conformance/test_impl.py::test_impl_decode[meta-float32-1x4]") == areas.DECODE
    assert areas.area_of_test("conformance/test_impl.py::test_load_says_what_is_wrong[x]") == areas.NUMERICS
    assert areas.area_of_test("/site-packages/conformance/test_tokenizer.py::test_t") == areas.TOKENIZER
    assert areas.record_area({"test": "elsewhere.py::t", "component": "kv_cache"}) == areas.DECODE
    assert areas.record_area({"test": "elsewhere.py::t", "component": "made_up"}) == areas.OTHER
    assert areas.in_battery("/x/site-packages/conformance/test_mlp.py", BATTERY) == "conformance/test_mlp.py"


def test_terminal_summary_gives_the_scope_and_the_scorecard(document):
    from parity.summary import scope_lines

    scope, card = scope_lines(document["environment"], document["records"], document["tests"],
                              document["not_checked"])
    assert scope == (f"scope: 9 of {len(BATTERY)} battery modules (part of the battery) · meshes 1x1, 1x4 · "
                     "dtypes float32, bfloat16 · references meta, hf · profile default")
    assert card == ("areas: numerics fail · communication not run · sharding pass · decode not run · "
                    "generation pass · checkpoints not run · tokenizer not run")


def test_margins():
    record = {"metrics": {"rel_l2": 2e-6, "pcc": 0.99998, "max_abs": 5.0}, "bounds": {"rel_l2": 1e-5, "pcc": 0.99999},
              "error": None}
    used, metric = pr.record_margin(record)
    assert metric == "pcc" and used == pytest.approx(2.0)  # (1 - 0.99998) / (1 - 0.99999)
    assert pr.record_margin({**record, "error": "shape mismatch"}) == (math.inf, "error")
    assert pr.margin_text(math.inf) == "∞" and pr.margin_text(0.1234) == "0.12×"


# ---- the plugin writes it -------------------------------------------------------------------------------------


INNER_TESTS = """
import numpy as np
import pytest

from parity import assert_parity

X = np.linspace(-1, 1, 24).reshape(2, 3, 4)


@pytest.fixture(scope="session")
def weights(request):
    from parity.plugin import note_seed

    note_seed(request.config, "weights", 17)


@pytest.mark.parametrize("i", range(6))
def test_pass(request, weights, i):
    assert_parity(request, component="rmsnorm", actual=X, expected=X, reference="meta", dtype="float32",
                  mesh="1x4", name=f"layers.{i % 2}.out")


def test_scale_bug(request):
    assert_parity(request, component="mlp", actual=2 * X, expected=X, reference="hf", dtype="float32", mesh="1x1")


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_error(broken):
    pass


def test_plain_failure():
    assert 1 == 2, "not a parity failure"
"""


def _inner(pytester, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest(INNER_CONFTEST)
    pytester.makepyfile(test_inner=INNER_TESTS)


@pytest.mark.e2e
def test_plugin_writes_the_report_under_xdist_with_failures(pytester, monkeypatch):
    _inner(pytester, monkeypatch)
    report, out = pytester.path / "sub" / "parity.html", pytester.path / "out" / "parity.json"  # folders made
    result = pytester.runpytest_subprocess("-n", "2", f"--parity-report={report}", f"--parity-json={out}")
    result.assert_outcomes(passed=6, failed=2, errors=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines(["*parity summary*", "verdict: FAIL (3 failed/error of 9 tests)",
                                 "scope: 1 module (the battery's modules not recorded) · meshes 1x1, 1x4 · "
                                 "dtypes float32 · references hf, meta · profile default",
                                 "areas: numerics fail · communication not run · sharding not run · decode not run"
                                 " · generation not run · checkpoints not run · tokenizer not run · other fail",
                                 "*worst per component*", f"parity report: {report}"])
    dom = parse(report.read_text(encoding="utf-8"))
    document = json.loads(out.read_text())
    assert len(dom.one("table", id="record-table").one("tbody").all("tr")) == len(document["records"]) == 7
    problems = {li.attrs["data-nodeid"]: squash(li.text()) for li in dom.one("ul", cls="problems").all("li")
                if "data-nodeid" in li.attrs}
    assert set(problems) == {"test_inner.py::test_scale_bug", "test_inner.py::test_error",
                             "test_inner.py::test_plain_failure"}
    assert "fixture broke" in problems["test_inner.py::test_error"]
    assert "not a parity failure" in problems["test_inner.py::test_plain_failure"]
    assert f"rel_l2 = 1.000e+00 > {bound('mlp', 'float32', 'rel_l2', 'hf', '1x1'):.3e}" in problems[
        "test_inner.py::test_scale_bug"]
    assert squash(dom.one("div", cls="verdict").text()).startswith("FAIL")
    assert squash(dom.one("title").text()) == "Parity report: FAIL · tp_llama.adapter:TPLlamaAdapter"
    assert "version not recorded" not in report.read_text(encoding="utf-8")
    assert document["environment"]["seeds"] == {"weights": 17}  # noted on a worker, shipped to the controller
    assert "weights=17" in dom.one("section", id="environment").text()


@pytest.mark.e2e
def test_summary_says_when_no_report_is_written_and_why_one_failed(pytester, monkeypatch):
    _inner(pytester, monkeypatch)
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-k", "test_pass")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["verdict: PASS (0 failed/error of 6 tests)",
                                 "parity report: not written (add --parity-report PATH for the HTML report)"])
    folder = pytester.path / "a_folder"
    folder.mkdir()
    result = pytester.runpytest_subprocess("-p", "no:xdist", "-k", "test_pass", f"--parity-report={folder}")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR  # a green run without its report must not look green
    result.stdout.fnmatch_lines([f"parity report NOT written to {folder}: IsADirectoryError*"])


# ---- the command over saved JSON (python -m parity.report_cli) ---------------------------------------------------

SIMPLE = {"factory": "examples.simple_llama.adapter:SimpleLlamaAdapter", "package": "simple-llama", "version": "1.0"}


def _save(path: Path, document: dict) -> str:
    path.write_text(json.dumps(document), encoding="utf-8")
    return str(path)


def _host(document: dict, platform: str, **environment) -> dict:
    """The same run as seen from another host: its own platform (and whatever else is given)."""
    return {**document, "environment": {**document["environment"], "platform": platform, **environment}}


def test_command_renders_one_saved_run_like_the_plugin(tmp_path, document, capsys):
    source = _save(tmp_path / "a.json", document)
    out = tmp_path / "sub" / "report.html"
    assert report_cli.main([source, "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"parity report: {out} (1 run, 1 implementation, "
                                               f"{len(document['records'])} records)")
    dom = parse(out.read_text(encoding="utf-8"))
    assert squash(dom.one("title").text()).startswith("Parity report: FAIL · tp_llama.adapter:TPLlamaAdapter")
    assert len(dom.one("table", id="record-table").one("tbody").all("tr")) == len(document["records"])
    assert _cells(dom).keys() == _cells(parse(pr.render(document))).keys()
    assert [squash(th.text()) for th in dom.all("table", cls="env")[0].all("th")][0] == "implementation under test"


def test_command_merges_several_hosts_of_one_implementation(tmp_path):
    """Two hosts ran the same implementation: one column group, cells over both hosts' records, outcomes per
    host (the same test passes on one and fails on the other), one environment column per host."""
    test = "conformance/test_mlp.py::test_mlp[meta-float32-1x4]"
    ok = sample_records(test, [{**scope_of("mlp", "meta", "float32", "1x4"), **scaled(0.5 * bound("mlp", "float32",
                                                                                              "rel_l2"))}])
    bad = sample_records(test, [{**scope_of("mlp", "meta", "float32", "1x4"), **scaled(2 * bound("mlp", "float32",
                                                                                             "rel_l2"))}])
    base = {"environment": {"implementation": IMPLEMENTATION, "platform": "cpu-host"}, "exitstatus": 0}
    a = _save(tmp_path / "cpu.json", {**base, "records": ok, "tests": [{"nodeid": test, "outcome": "passed",
                                                                        "message": None}]})
    b = _save(tmp_path / "tpu.json", _host({**base, "exitstatus": 1, "records": bad, "tests": [
        {"nodeid": test, "outcome": "failed", "message": "AssertionError: parity failed"}]}, "tpu-host",
        devices={"platform": "tpu", "kind": "TPU v4", "count": 8}))
    out = tmp_path / "merged.html"
    assert report_cli.main([a, b, "-o", str(out)]) == 0
    dom = parse(out.read_text(encoding="utf-8"))
    assert squash(dom.one("title").text()) == ("Parity report: FAIL · tp_llama.adapter:TPLlamaAdapter "
                                               "(tp-llama-conformance 0.4.0)")
    assert "2 tests in 2 runs: 1 passed, 1 failed" in squash(dom.one("div", cls="verdict").text())
    assert not dom.all("table", cls="implementations") and not dom.all("th", cls="group")
    (cell,) = _cells(dom).values()
    assert "fail" in cell.classes() and cell.attrs["title"].startswith("2 records, 1 failing")
    assert squash(cell.one("b").text()) == "2×"
    rows = dom.one("table", id="record-table").one("tbody").all("tr")
    assert [(r.attrs["data-outcome"], squash(r.one("span", cls="run-tag").text())) for r in rows] == [
        ("fail", b), ("pass", a)]
    (failure,) = dom.one("div", id="failures").all("li")
    assert b in squash(failure.text())
    env = dom.one("section", id="environment").all("table")[0]
    assert [squash(th.text()) for th in env.one("thead").all("th")] == ["run", a, b]
    settings = {squash(tr.one("th").text()): [squash(td.text()) for td in tr.all("td")]
                for tr in env.all("tr") if tr.all("td")}
    assert settings["platform"] == ["cpu-host", "tpu-host"]
    assert settings["devices"] == ["not reported (no process had started a JAX backend)", "8 x TPU v4 (tpu)"]


def test_command_puts_several_implementations_side_by_side(tmp_path, document):
    """Two implementations, one column group each in every dtype's matrix; the older `impl` string is read too."""
    legacy = {**document, "environment": {**{k: v for k, v in document["environment"].items()
                                             if k != "implementation"},
                                          "implementation": "CPython", "impl": "tp_llama.adapter:TPLlamaAdapter"}}
    simple_records = [dict(r) for r in document["records"] if r["component"] == "mlp"]
    for r in simple_records:
        r["passed"], r["failed_metrics"] = True, []
    other = {"environment": {"implementation": SIMPLE}, "exitstatus": 0, "records": simple_records,
             "tests": [{"nodeid": n, "outcome": "passed", "message": None}
                       for n in dict.fromkeys(r["test"] for r in simple_records)]}
    sources = [_save(tmp_path / "builtin.json", legacy), _save(tmp_path / "host2.json", _host(legacy, "other")),
               _save(tmp_path / "simple.json", other)]
    out = tmp_path / "side.html"
    assert report_cli.main([*sources, "-o", str(out)]) == 0
    dom = parse(out.read_text(encoding="utf-8"))
    assert squash(dom.one("title").text()) == "Parity report: FAIL · 2 implementations"
    impls = {tr.attrs["data-implementation"]: [squash(td.text()) for td in tr.all("td")]
             for tr in dom.one("table", cls="implementations").one("tbody").all("tr")}
    assert list(impls) == ["TPLlamaAdapter", "simple-llama 1.0"]
    assert impls["TPLlamaAdapter"][0] == "FAIL" and impls["simple-llama 1.0"][0] == "PASS"
    assert impls["TPLlamaAdapter"][-1] == f"{sources[0]}, {sources[1]}"  # two hosts, one implementation
    assert impls["simple-llama 1.0"][1] == "3: 3 passed"
    float32 = dom.one("table", cls="matrix", data_dtype="float32")
    groups = [(squash(th.text()), th.attrs["colspan"]) for th in float32.all("th", cls="group")]
    builtin_meshes = sorted({_column(r) for r in document["records"] if r["dtype"] == "float32"},
                            key=pr._mesh_order)
    assert groups == [("TPLlamaAdapter", str(len(builtin_meshes))), ("simple-llama 1.0", "2")]
    side = {(c.attrs["data-implementation"], c.attrs["data-mesh"]): c
            for c in float32.all("td", cls="cell") if c.attrs["data-component"] == "mlp"
            and c.attrs["data-reference"] == "meta"}
    assert "fail" in side["TPLlamaAdapter", "1x4"].classes() and "pass" in side["simple-llama 1.0", "1x4"].classes()
    assert side["TPLlamaAdapter", "1x4"].attrs["title"].startswith("2 records, 2 failing")  # both hosts
    selects = {s.attrs["data-filter"]: [o.attrs["value"] for o in s.all("option")] for s in dom.all("select")}
    assert selects["implementation"] == ["", "TPLlamaAdapter", "simple-llama 1.0"]
    rows = dom.one("table", id="record-table").one("tbody").all("tr")
    assert {r.attrs["data-implementation"] for r in rows} == {"TPLlamaAdapter", "simple-llama 1.0"}
    assert len(rows) == 2 * len(document["records"]) + len(simple_records)
    labels = [squash(t.text()) for t in dom.one("section", id="depth").all("td")][:3]
    assert labels[1].startswith("TPLlamaAdapter · ")


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("{not json", "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)"),
    ("[1, 2]", "not a --parity-json document: the top level is a JSON list, not an object"),
    ('{"tests": []}', "not a --parity-json document: no 'records' list"),
    ('{"records": [{"test": "t"}], "tests": []}', "not a --parity-json document: records[0] has no 'component'"),
    ('{"records": [], "tests": [{}]}', "not a --parity-json document: tests[0] has no 'nodeid' and 'outcome'"),
    (b"\xff\xfe\x00", "not a text file (not UTF-8), not a --parity-json file"),
])
def test_command_says_in_one_line_what_is_wrong_with_a_file(tmp_path, document, capsys, content, problem):
    good = _save(tmp_path / "good.json", document)
    bad = tmp_path / "bad.json"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    elif content is not None:
        bad.write_text(content, encoding="utf-8")
    out = tmp_path / "report.html"
    assert report_cli.main([good, str(bad), "-o", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"python -m parity.report_cli: error: {bad}: {problem}\n" and captured.out == ""
    assert not out.exists()


@pytest.mark.e2e
def test_command_runs_as_a_module_and_rejects_a_directory(tmp_path, document):
    import subprocess
    import sys

    good = _save(tmp_path / "good.json", document)
    run = subprocess.run([sys.executable, "-m", "parity.report_cli", good, str(tmp_path), "-o",
                          str(tmp_path / "r.html")], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr == (f"python -m parity.report_cli: error: {tmp_path}: is a directory, "
                                                  "not a --parity-json file\n")
    run = subprocess.run([sys.executable, "-m", "parity.report_cli", good, "-o", str(tmp_path / "r.html")], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and (tmp_path / "r.html").read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    run = subprocess.run([sys.executable, "-m", "parity.report_cli", good], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2 and "-o/--output" in run.stderr  # where to write is never guessed
