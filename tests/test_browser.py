"""The example app in a real browser: Debian's Chromium, driven by Selenium.

Without Chromium, chromedriver or Selenium these tests skip, except in CI
(``CI=true``), where ``.ci/run`` installs them. Each test leaves a screenshot
in ``$MIDDLESTORM_ARTIFACTS`` (``.ci/run`` keeps them in ``ci-artifacts/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import IN_CI, make_database
from tests.servers import Server, start_server

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")


def _missing() -> str | None:
    if BROWSER is None or DRIVER is None:
        return "Chromium or chromedriver is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "Selenium is not installed (pip install selenium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator:
    problem = _missing()
    if problem is not None:
        if IN_CI:
            pytest.fail(f"{problem}; CI must run the browser tests")
        pytest.skip(problem)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=900,1000")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(5)
    yield driver
    driver.quit()


@pytest.fixture
def notes(tmp_path) -> Iterator[tuple[Server, object]]:
    """The example app under its dev server, on an SQLite database of the test's own."""
    db = make_database("sqlite", tmp_path / "db", tables=False)
    command = ["{python}", "-m", "example_app", "--db", db.uri, "--port", "{port}", "--no-reload"]
    server = start_server(command, db.uri, tmp_path / "server.log")
    yield server, db
    server.stop()


@pytest.fixture(autouse=True)
def screenshot(request, tmp_path) -> Iterator[None]:
    yield
    driver = request.node.funcargs.get("browser")
    if driver is not None:
        folder = Path(os.environ.get("MIDDLESTORM_ARTIFACTS") or tmp_path)
        folder.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(folder / f"{request.node.name}.png"))


def find(browser, css: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css)


def find_all(browser, css: str) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, css)


def add_note(browser, base_url: str, text: str) -> None:
    browser.get(base_url + "/")
    find(browser, "#new-body").send_keys(text)
    find(browser, "form.new button").click()


def listed(browser) -> list[str]:
    return [item.text for item in find_all(browser, ".note .body")]


def test_a_note_written_in_the_browser_is_listed_and_committed(browser, notes):
    server, db = notes
    long_text = "A note longer than any input box: " + "word " * 60

    add_note(browser, server.base_url, long_text)

    assert find(browser, ".flash").text == "Note added: committed before this page was asked for."
    assert listed(browser) == [long_text.strip()]
    assert db.notes() == [long_text.strip()]
    assert "read-only transaction" in find(browser, "#middlestorm").text


def test_a_note_edited_in_the_browser_keeps_the_new_text(browser, notes):
    server, db = notes
    add_note(browser, server.base_url, "first draft")

    find(browser, ".note .actions a[href$='/notes/1']").click()
    editor = find(browser, "#body")
    editor.clear()
    editor.send_keys("final text")
    find(browser, "form button[type=submit]").click()

    assert find(browser, ".flash").text.startswith("Note saved")
    assert listed(browser) == ["final text"]
    assert "edited" in find(browser, ".note .meta").text
    assert db.notes() == ["final text"]


def test_a_note_is_deleted_only_once_the_deletion_is_confirmed(browser, notes):
    server, db = notes
    add_note(browser, server.base_url, "keep me, then delete me")

    find(browser, ".note a.danger").click()
    assert "Delete this note?" in browser.page_source
    find(browser, "a.button.plain").click()  # Cancel
    assert listed(browser) == ["keep me, then delete me"]

    find(browser, ".note a.danger").click()
    find(browser, "button.danger").click()

    assert find(browser, ".flash").text.startswith("Note deleted")
    assert listed(browser) == [] and find(browser, ".empty").text == "No notes yet."
    assert db.notes() == []


def test_a_blank_note_is_refused_on_the_page_and_nothing_is_saved(browser, notes):
    server, db = notes

    add_note(browser, server.base_url, "   ")

    assert find(browser, ".error").text == "body must not be empty"
    assert "as the form had a mistake" in find(browser, "#middlestorm").text
    assert browser.current_url == server.base_url + "/"
    assert db.notes() == []
