"""The worklist page in real headless Chromium (Selenium + Debian's chromium-driver)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from worklistdata import PLAN, PRIORITY, TOKEN, live_server, make_config, populate

from triage_node import store

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
           "chromium-driver)")

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGGED = PLAN[2].uid


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(driver: WebDriver, condition: object, timeout: float = 20) -> object:
    # The table is re-drawn when the polled worklist changes: retry on stale elements.
    wait = WebDriverWait(driver, timeout, ignored_exceptions=[StaleElementReferenceException])
    return wait.until(condition)  # type: ignore[arg-type]


def _rows(driver: WebDriver) -> list[str]:
    return list(driver.execute_script(
        "return [...document.querySelectorAll('#worklist tbody tr')]"
        ".map((tr) => tr.dataset.series)"))


def _click(driver: WebDriver, selector: str) -> None:
    """Click in one script call (no element reference to go stale in between)."""
    driver.execute_script("document.querySelector(arguments[0]).click()", selector)


def _row_text(driver: WebDriver, uid: str) -> str:
    return str(driver.execute_script(
        "const tr = document.querySelector(`tr[data-series=\"${arguments[0]}\"]`);"
        "return tr ? tr.innerText : ''", uid))


def test_worklist_page(tmp_path: Path, browser: WebDriver,
                       session_factory: sessionmaker[Session]) -> None:
    populate(session_factory)
    url = session_factory.kw["bind"].url.render_as_string(hide_password=False)
    config = make_config(tmp_path, url, token=TOKEN)
    with live_server(config) as base:
        browser.get(f"{base}/?poll_ms=500")
        # Auth is on: the page asks to sign in; a wrong token is refused.
        login = _wait(browser, lambda d: d.find_element(By.ID, "login-user"))
        assert login is not None
        browser.find_element(By.ID, "login-user").send_keys("dr_browser")
        browser.find_element(By.ID, "login-secret").send_keys("wrong")
        browser.find_element(By.ID, "login-submit").click()
        _wait(browser, lambda d: d.find_element(By.ID, "login-error").text == "Not accepted.")
        browser.find_element(By.ID, "login-secret").clear()
        browser.find_element(By.ID, "login-secret").send_keys(TOKEN)
        browser.find_element(By.ID, "login-submit").click()

        # The worklist in priority order, flagged rows highlighted.
        _wait(browser, lambda d: len(_rows(d)) == len(PLAN))
        assert _rows(browser) == PRIORITY
        assert browser.execute_script(
            "return [...document.querySelectorAll('#worklist tbody tr.flagged')]"
            ".map((tr) => tr.dataset.series)") == PRIORITY[:2]
        colours = browser.execute_script(
            "return [...document.querySelectorAll('#worklist tbody tr')]"
            ".map((tr) => getComputedStyle(tr).backgroundColor)")
        assert colours[0] == colours[1] != colours[2]
        assert "SECRETNAME" not in browser.page_source

        # Sortable: by patient ID, then back to priority.
        _click(browser, "th[data-key=patient_id]")
        assert _rows(browser) == [p.uid for p in sorted(PLAN, key=lambda p: p.patient_id)]
        _click(browser, "th[data-key=patient_id]")
        assert _rows(browser)[0] == PLAN[-1].uid  # descending
        _click(browser, "th[data-key=priority]")
        assert _rows(browser) == PRIORITY

        # Live updates: a new verdict recorded elsewhere shows up without a reload.
        store.record_feedback(session_factory, PLAN[1].uid, user="dr_elsewhere", ich=False,
                              subtypes={})
        _wait(browser, lambda d: "dr_elsewhere" in _row_text(d, PLAN[1].uid))

        # The detail: key image and heatmap loaded, probability curve drawn.
        _click(browser, f'tr[data-series="{FLAGGED}"]')
        _wait(browser, lambda d: d.find_element(By.ID, "detail").is_displayed())
        _wait(browser, lambda d: d.execute_script(
            "const i = document.getElementById('img-heatmap');"
            "return i.complete && i.naturalWidth > 0"))
        assert browser.execute_script(
            "return document.getElementById('img-plain').naturalWidth") == 32
        assert "P-C" in browser.find_element(By.ID, "detail-title").text
        assert browser.find_elements(By.CSS_SELECTOR, "#curve polyline")
        assert "instance(s) stored" in browser.find_element(By.ID, "audit").text

        # Feedback through the page: confirm ICH with a subdural bleed.
        browser.find_element(By.ID, "fb-user").clear()
        browser.find_element(By.ID, "fb-user").send_keys("dr_browser")
        browser.find_element(By.CSS_SELECTOR, "input[name=subtype][value=subdural]").click()
        browser.find_element(By.ID, "fb-comment").send_keys("acute SDH")
        browser.find_element(By.ID, "fb-confirm").click()
        _wait(browser, lambda d: d.find_element(By.ID, "fb-status").text.startswith("Saved"))
        _wait(browser, lambda d: "ICH (dr_browser)" in _row_text(d, FLAGGED))

        browser.execute_script("window.scrollTo(0, 0)")
        shot = tmp_path / "worklist.png"
        assert browser.save_screenshot(str(shot))
    data = shot.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000

    # In the database, audited, and in the training labels.
    (verdict,) = store.list_feedback(session_factory, FLAGGED)
    assert verdict.user == "dr_browser" and verdict.ich is True
    assert verdict.subtypes["subdural"] is True and verdict.comment == "acute SDH"
    assert sum(v for v in verdict.subtypes.values()) == 1
    events = store.series_events(session_factory, FLAGGED)
    assert events[-1].kind.value == "feedback_recorded" and events[-1].actor == "dr_browser"
    labels = {x.series_instance_uid: x.labels for x in
              store.worklist.feedback_labels(session_factory)}
    assert labels[FLAGGED]["any"] == 1 and labels[FLAGGED]["subdural"] == 1
    assert labels[PLAN[1].uid]["any"] == 0
