"""The HTML parity report in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium opens the file from disk, and the matrix, the chart and the tables must render, the filters must
filter, and the page must log no console error. At a 1400-pixel window both dtypes' matrices must fit without
horizontal scrolling (real layout: bounding boxes, scrollWidth, hit tests). Screenshots land in out/ for people
to look at: the whole page, and the matrices alone.

Run with `pytest -m browser` (the default addopts deselect it); it skips, saying what to install, when
Chromium, ChromeDriver or selenium is missing.
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from parity import report as pr
from tests.report_samples import DRAWN_MESHES, GEN, LONG, sample_document

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "out" / "parity_report.png"
MATRIX_SCREENSHOT = REPO / "out" / "parity_report_matrix.png"
WIDTH = 1400  # a laptop-width window
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", f"--window-size={WIDTH},1000")
INSTALL = "apt-get install -y chromium chromium-driver && pip install selenium"


def _executable(*names: str) -> str | None:
    return next((found for found in map(shutil.which, names) if found), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile and the console log captured."""
    chromium, driver_path = _executable("chromium", "chromium-browser"), _executable("chromedriver")
    if not chromium or not driver_path:
        pytest.skip(f"Chromium or ChromeDriver not found on PATH; install them: {INSTALL}")
    webdriver = pytest.importorskip("selenium.webdriver", reason=f"selenium is not installed; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def report_page(browser, tmp_path_factory):
    """The sample report opened from disk, after proving the console log reaches us (so 'no errors' means it)."""
    browser.get("about:blank")
    browser.execute_script("console.error('console probe')")
    probe = browser.get_log("browser")
    assert any("console probe" in entry["message"] for entry in probe), f"console log not captured: {probe}"
    path = tmp_path_factory.mktemp("report") / "parity.html"
    document = sample_document()
    pr.write_report(path, document)
    browser.get(path.as_uri())
    return browser, document


def _visible_rows(driver) -> list[dict]:
    return driver.execute_script("""
        return Array.from(document.querySelectorAll('#record-table tbody tr'))
            .filter(tr => !tr.hidden && tr.getBoundingClientRect().height > 0)
            .map(tr => Object.assign({}, tr.dataset, {margin: parseFloat(tr.cells[7].dataset.value)}));""")


def _box(driver, selector: str) -> dict:
    return driver.execute_script(
        "const r = document.querySelector(arguments[0]).getBoundingClientRect();"
        "return {width: r.width, height: r.height};", selector)


def test_report_renders_filters_and_logs_no_error(report_page):
    driver, document = report_page
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    assert driver.title == "Parity report: FAIL · tp_llama.adapter:TPLlamaAdapter (tp-llama-conformance 0.4.0)"
    # the matrix: every cell drawn, pass and fail cells coloured differently
    cells = driver.find_elements(By.CSS_SELECTOR, "table.matrix td.cell")
    assert len(cells) == len({(r["component"], r["reference"], r["dtype"],
                               "drawn" if r["mesh"] in DRAWN_MESHES else r["mesh"]) for r in document["records"]})
    assert all(c.size["width"] > 40 and c.size["height"] > 20 for c in cells)
    colours = {c.get_attribute("class"): c.value_of_css_property("background-color") for c in cells}
    assert colours["cell pass"] != colours["cell fail"] != colours["cell expected-fail"]
    # the chart: a real-size SVG with every line drawn
    chart = _box(driver, "figure.chart svg")
    assert chart["width"] > 600 and chart["height"] > 150, chart
    lines = driver.execute_script("return Array.from(document.querySelectorAll('figure.chart g[id^=depth-]'))"
                                  ".map(g => g.getBBox().width);")
    assert len(lines) == 8 and all(width > 50 for width in lines), lines
    # the tables
    rows = _visible_rows(driver)
    assert len(rows) == len(document["records"])
    assert driver.find_element(By.ID, "record-count").text == f"{len(rows)} of {len(rows)} records shown"
    generation = driver.find_element(By.CSS_SELECTOR, "details.generation")
    assert GEN in generation.text and not generation.find_element(By.CSS_SELECTOR, "tr.diverge").is_displayed()
    summary = generation.find_element(By.TAG_NAME, "summary")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", summary)
    summary.click()  # a passing record is folded until opened
    assert generation.find_element(By.CSS_SELECTOR, "table.stream tr.diverge").is_displayed()
    assert generation.find_element(By.CSS_SELECTOR, "table.topk").is_displayed()
    assert driver.find_element(By.CSS_SELECTOR, "#environment table.versions").is_displayed()

    # filtering by outcome, then by clicking a matrix cell, then by text
    Select(driver.find_element(By.CSS_SELECTOR, "select[data-filter=outcome]")).select_by_value("fail")
    outcomes = {t["nodeid"]: t["outcome"] for t in document["tests"]}
    failing = [r for r in document["records"] if pr.record_outcome(r, outcomes[r["test"]]) == "fail"]
    assert {(r["component"], r["outcome"]) for r in _visible_rows(driver)} == {(r["component"], "fail")
                                                                               for r in failing}
    assert driver.find_element(By.ID, "record-count").text == f"{len(failing)} of {len(rows)} records shown"
    cell = driver.find_element(By.CSS_SELECTOR, "table.matrix td.cell[data-component=intermediate]"
                                                "[data-reference=hf][data-dtype=bfloat16][data-mesh='1x4']")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)  # out from under the header
    cell.click()
    shown = _visible_rows(driver)
    assert len(shown) == 4 and {(r["component"], r["reference"], r["dtype"], r["mesh"]) for r in shown} == {
        ("intermediate", "hf", "bfloat16", "1x4")}
    driver.find_element(By.ID, "record-search").send_keys("layers.2.")
    assert len(_visible_rows(driver)) == 1
    driver.find_element(By.ID, "filters-reset").click()
    assert len(_visible_rows(driver)) == len(rows)

    # the drawn column: its cell lists the records of every drawn mesh, and so does the mesh filter's "drawn"
    drawn = [r for r in document["records"] if r["mesh"] in DRAWN_MESHES]
    cell = driver.find_element(By.CSS_SELECTOR, "table.matrix td.cell[data-component=property][data-reference=meta]"
                                                "[data-dtype=bfloat16][data-mesh=drawn]")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    cell.click()
    assert sorted(r["mesh"] for r in _visible_rows(driver)) == sorted(
        r["mesh"] for r in drawn if r["component"] == "property" and r["dtype"] == "bfloat16")
    driver.find_element(By.ID, "filters-reset").click()
    Select(driver.find_element(By.CSS_SELECTOR, "select[data-filter=mesh]")).select_by_value("drawn")
    assert len(_visible_rows(driver)) == len(drawn)
    driver.find_element(By.ID, "filters-reset").click()

    # a failure's button shows exactly that test's records
    driver.execute_script("window.scrollTo(0, 0)")
    button = driver.find_element(By.CSS_SELECTOR, f"#failures li[data-nodeid='{LONG}'] button.show-records")
    button.click()
    shown = _visible_rows(driver)
    assert {r["test"] for r in shown} == {LONG} and len(shown) == sum(r["test"] == LONG for r in document["records"])
    assert driver.find_element(By.ID, "record-count").text.endswith("records shown (one test)")
    driver.find_element(By.ID, "filters-reset").click()
    assert len(_visible_rows(driver)) == len(rows)

    # sorting by margin, worst first on the second click; NaN (an error) is the worst of all
    header = driver.find_element(By.XPATH, "//table[@id='record-table']//th[normalize-space()='margin']")
    header.click()
    header.click()
    margins = [r["margin"] for r in _visible_rows(driver)]
    assert margins == sorted(margins, reverse=True) and _visible_rows(driver)[0]["component"] == "rope"

    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, f"the report logged console errors: {errors}"


def test_a_failing_report_opens_on_its_failures_and_both_matrices_fit_1400_px(report_page):
    """The first screen of a failing report shows the verdict, the run's scope and its scorecard whole, and the
    failures begin on it; at 1400 px the float32 and bfloat16 matrices are both inside the window's width (side by
    side or stacked), and nothing scrolls sideways."""
    driver, document = report_page
    driver.execute_script("window.scrollTo(0, 0)")
    assert driver.execute_script("return window.innerWidth") == WIDTH
    layout = driver.execute_script("""
        const doc = document.documentElement, box = e => e.getBoundingClientRect();
        const failures = document.getElementById('failures');
        return {scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth, innerWidth: window.innerWidth,
                innerHeight: window.innerHeight, failuresTop: box(failures).top,
                scopeBottom: box(document.getElementById('scope')).bottom,
                scorecardBottom: box(document.getElementById('scorecard')).bottom,
                tables: Array.from(document.querySelectorAll('table.matrix')).map(t => ({
                    dtype: t.dataset.dtype, left: box(t).left, right: box(t).right, width: box(t).width,
                    cellsRight: Math.max(...Array.from(t.querySelectorAll('th, td')).map(c => box(c).right))}))};""")
    # the scope and the scorecard (issue 26) now come first, so the failures begin lower on the first screen
    assert layout["scopeBottom"] < layout["innerHeight"] and layout["scorecardBottom"] < layout["innerHeight"], layout
    assert layout["failuresTop"] < layout["innerHeight"], "the failures do not begin on the first screen"
    assert layout["scrollWidth"] <= layout["innerWidth"], f"the page scrolls sideways: {layout}"
    tables = {t["dtype"]: t for t in layout["tables"]}
    assert set(tables) == {"float32", "bfloat16"}
    for table in tables.values():
        assert table["left"] >= 0 and table["right"] <= layout["clientWidth"], table
        assert table["cellsRight"] <= layout["clientWidth"] and table["width"] > 300, table
    # real visibility: the last column of each table is what the browser hit-tests at its centre
    for dtype in tables:
        hit = driver.execute_script("""
            const t = document.querySelector('table.matrix[data-dtype="' + arguments[0] + '"]');
            const heads = t.tHead.rows[t.tHead.rows.length - 1].cells, last = heads[heads.length - 1];
            last.scrollIntoView({block: 'center', inline: 'nearest'});
            const r = last.getBoundingClientRect();
            const found = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            return [window.scrollX, found === last || last.contains(found), last.textContent.trim()];""", dtype)
        assert hit == [0, True, "drawn"], (dtype, hit)
    _save_screenshot(driver)
    _save_matrix_screenshot(driver)


def _save_matrix_screenshot(driver) -> None:
    """The two matrices alone, as they sit in the 1400-pixel window."""
    driver.execute_script("window.scrollTo(0, 0)")
    box = driver.execute_script("const r = document.querySelector('#matrix').getBoundingClientRect();"
                                "return {x: r.left, y: r.top + window.scrollY, width: r.width, height: r.height};")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": {**box, "scale": 1}})
    MATRIX_SCREENSHOT.parent.mkdir(exist_ok=True)
    MATRIX_SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))


def _save_screenshot(driver) -> None:
    """The whole page as one PNG in out/ (gitignored), for the person reviewing the report."""
    driver.execute_script("window.scrollTo(0, 0)")  # else the sticky header is drawn where the page was scrolled
    width, height = driver.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": {"x": 0, "y": 0, "width": width,
                                                                      "height": height, "scale": 1}})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
