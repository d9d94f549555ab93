"""Headless Chromium (Debian's package, driven by playwright) opens the playground, generates and sees streaming."""

import pytest

from _serve_helpers import CHROMIUM, chromium_page, live_server, make_app

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium: apt-get install -y chromium")
pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
# Counts the separate updates of the output box, to tell streaming from one late answer.
COUNT_UPDATES = """() => { window.updates = 0;
  new MutationObserver(() => window.updates++).observe(document.getElementById('output'),
                                                       {childList: true, subtree: true, characterData: true}); }"""


def test_playground_generates_and_streams_text(tiny):
    app = make_app(tiny, step_delay=0.02)
    with live_server(app) as url, chromium_page(url + "/", timeout_ms=15_000) as page:
        page.wait_for_function("document.getElementById('model').textContent.includes('context')")
        page.fill("#prompt", "Буря мглою")
        page.fill("#max_tokens", "20")
        page.select_option("#preset", "greedy")
        page.evaluate(COUNT_UPDATES)
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')")
        output = page.text_content("#output")
        updates = page.evaluate("window.updates")
        status = page.text_content("#status")
    assert output.startswith("Буря мглою") and len(output) > len("Буря мглою")
    assert updates > 3  # the prompt, then the text piece by piece
    assert status == "finished: length"


def test_playground_stop_button_cancels(tiny):
    app = make_app(tiny, step_delay=0.05)
    with live_server(app) as url, chromium_page(url + "/", timeout_ms=15_000) as page:
        page.fill("#max_tokens", "100")
        page.click("#generate")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('generating')")
        page.wait_for_timeout(200)
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('finished')")
        status = page.text_content("#status")
    assert status == "finished: cancelled"
