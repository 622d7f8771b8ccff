"""The HTML parity report in a real browser: headless Chromium (Debian's chromium + chromium-driver) driven by
selenium opens the file from disk, and the matrix, the chart and the tables must render, the filters must
filter, and the page must log no console error. A full-page screenshot lands in out/ for people to look at.

Run with `pytest -m browser` (the default addopts deselect it); it skips, saying what to install, when
Chromium, ChromeDriver or selenium is missing.
"""
from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from conformance.test_report import GEN, sample_document
from parity import report as pr

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "out" / "parity_report.png"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000")
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

    assert driver.title == "Parity report: FAIL"
    # the matrix: every cell drawn, pass and fail cells coloured differently
    cells = driver.find_elements(By.CSS_SELECTOR, "table.matrix td.cell")
    assert len(cells) == len({(r["component"], r["reference"], r["dtype"], r["mesh"]) for r in document["records"]})
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
    _save_screenshot(driver)
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

    # sorting by margin, worst first on the second click; NaN (an error) is the worst of all
    header = driver.find_element(By.XPATH, "//table[@id='record-table']//th[normalize-space()='margin']")
    header.click()
    header.click()
    margins = [r["margin"] for r in _visible_rows(driver)]
    assert margins == sorted(margins, reverse=True) and _visible_rows(driver)[0]["component"] == "rope"

    errors = [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]
    assert not errors, f"the report logged console errors: {errors}"


def _save_screenshot(driver) -> None:
    """The whole page as one PNG in out/ (gitignored), for the person reviewing the report."""
    driver.execute_script("window.scrollTo(0, 0)")  # else the sticky header is drawn where the page was scrolled
    width, height = driver.execute_script("const e = document.documentElement; return [e.scrollWidth, e.scrollHeight]")
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                             "clip": {"x": 0, "y": 0, "width": width,
                                                                      "height": height, "scale": 1}})
    SCREENSHOT.parent.mkdir(exist_ok=True)
    SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
