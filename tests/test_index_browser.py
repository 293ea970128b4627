"""The report index in a real headless browser: every link opens, every image loads (marker ``browser``).

Needs playwright (pip) and a Chromium: the system one (Debian: ``apt-get install chromium``; or set
``ZSAD_CHROMIUM`` to a binary) or playwright's own (``playwright install chromium``). Skipped, with the reason
naming what is missing, where either is absent, except under ``ZSAD_REQUIRE_BROWSER=1``, which ``.ci/run``
sets once it has a Chromium: there a missing piece fails the test, so CI cannot pass without the browser.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from plan_helpers import write_plan

from zsad.plans import load_plan, run_plan

pytestmark = pytest.mark.browser

BROKEN_IMAGES = "Array.from(document.images).filter(i => !i.complete || i.naturalWidth === 0).map(i => i.src)"


def _chromium() -> str | None:
    """A Chromium binary: $ZSAD_CHROMIUM, else one on PATH (None: playwright's own, if installed)."""
    env = os.environ.get("ZSAD_CHROMIUM")
    if env:
        return env
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.fixture(scope="module")
def browser():
    missing = pytest.fail if os.environ.get("ZSAD_REQUIRE_BROWSER") == "1" else pytest.skip
    try:
        from playwright import sync_api
    except ImportError:
        missing("playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as p:
        try:
            launched = p.chromium.launch(executable_path=_chromium(), headless=True)
        except Exception as err:  # playwright raises its own Error when no browser binary exists
            missing(
                "no Chromium for playwright: install one (apt-get install chromium, or `playwright install "
                f"chromium`) or set ZSAD_CHROMIUM ({str(err).splitlines()[0][:120]})"
            )
        yield launched
        launched.close()


def _open(page, url: str) -> bool:
    """Navigate; True for a page, False for a download (a CSV); a missing file raises."""
    try:
        page.goto(url)
    except Exception as err:
        if "Download is starting" in str(err):
            return False
        raise AssertionError(f"broken link {url}: {str(err).splitlines()[0]}") from None
    return True


def test_index_links_and_images_work_in_a_browser(browser, tmp_path):
    runs = [
        {"name": "good", "notebook": "tiny.ipynb", "parameters": {"value": 3}},
        {"name": "bad", "notebook": "tiny.ipynb", "parameters": {"value": 4, "fail": True}},
    ]
    plan = load_plan(write_plan(tmp_path, runs))
    reports = tmp_path / "reports"
    run_plan(plan, reports, progress=False)
    index = (reports / "index.html").resolve()
    page = browser.new_page()
    assert _open(page, index.as_uri())
    assert page.evaluate(BROKEN_IMAGES) == []
    assert page.evaluate("document.images.length") >= 1  # the plan's summary figure
    links = page.eval_on_selector_all("a[href]", "links => links.map(a => a.href)")
    assert any(link.endswith("good/tiny.html") for link in links), links
    assert any(link.endswith("bad/error.txt") for link in links), links
    shown = 0
    for link in links:
        assert link.startswith("file://"), f"the index must use relative links: {link}"
        assert Path(link.removeprefix("file://").split("#")[0]).exists(), link
        if _open(page, link):
            assert page.evaluate(BROKEN_IMAGES) == [], link
            shown += page.evaluate("document.images.length")
    assert shown >= 1  # the report page's figure is inline in the HTML
    # A link to a file that is gone is caught: the check above can fail.
    (reports / "tplan" / "good" / "tiny.html").unlink()
    _open(page, index.as_uri())
    with pytest.raises(AssertionError, match="broken link"):
        _open(page, next(link for link in links if link.endswith("good/tiny.html")))
