"""The chat page in a real headless Chromium (Debian's /usr/bin/chromium, driven by playwright-python).

Loads /, sends a message, waits for the streamed answer, checks the conversation continues over two turns and
that Stop aborts a long answer; screenshots are saved (see ARTIFACTS) with their paths printed. Skipped when
Chromium or playwright is missing (CI: `apt-get install -y chromium`, `pip install playwright`; never
`playwright install`: the system Chromium is used).
"""
import os
import shutil
import tempfile

import pytest

from test_server_fixtures import ScriptedEngine, engine_idle, serve, tiny_llm, wait_until

CHROMIUM = os.environ.get("QWEN3NEXT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# screenshots: $QWEN3NEXT_TEST_ARTIFACTS (CI uploads it) or a temp dir; the paths are printed (pytest -s)
ARTIFACTS = os.environ.get("QWEN3NEXT_TEST_ARTIFACTS") or os.path.join(tempfile.gettempdir(), "qwen3next_artifacts")
KEY = "web-key"

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM),
                                reason=f"no Chromium at {CHROMIUM} (apt-get install -y chromium)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                    "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page(viewport={"width": 1100, "height": 720})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.fill("#api-key", KEY)
    page.dispatch_event("#api-key", "change")
    return page, errors


def _screenshot(page, name):
    os.makedirs(ARTIFACTS, exist_ok=True)
    path = os.path.join(ARTIFACTS, name)
    page.screenshot(path=path, full_page=True)
    print(f"\nscreenshot: {path}")


def test_chat_page_streams_thinking_and_answers(browser):
    reply = "<think>\nThe user greets me. I should greet back.\n</think>\n\nHello! How can I help you today?"
    engine = ScriptedEngine(lambda prompt: reply, step_delay=0.02)
    with serve(engine, api_key=KEY) as srv:
        page, errors = _open(browser, srv.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#prompt", "Hi there!")
        page.press("#prompt", "Enter")
        answer = page.locator(".msg.assistant .bubble").last
        sync_api.expect(answer).to_have_text("Hello! How can I help you today?", timeout=15000)
        sync_api.expect(page.locator(".msg.assistant details.thinking .reasoning").last).to_have_text(
            "The user greets me. I should greet back.")
        sync_api.expect(page.locator("#send")).to_be_visible()
        page.fill("#prompt", "And again?")
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant .bubble")).to_have_count(2)
        sync_api.expect(page.locator(".msg.assistant .bubble").last).to_have_text(
            "Hello! How can I help you today?", timeout=15000)
        # the second request carried the whole conversation, with the first answer (not its thinking)
        assert "Hi there!" in engine.prompts[-1] and "How can I help you today?" in engine.prompts[-1]
        _screenshot(page, "chat_page_scripted.png")
        assert not errors, errors
        page.close()


def test_chat_page_with_the_real_model_streams_and_stops(browser):
    llm = tiny_llm(max_model_len=256, max_num_seqs=2)
    with serve(llm, api_key=KEY) as srv:
        page, errors = _open(browser, srv.url + "/")
        page.wait_for_function("document.querySelector('#model').options.length > 0")
        page.fill("#max-tokens", "12")
        page.fill("#prompt", "Tell me a story.")
        page.click("#send")
        sync_api.expect(page.locator(".msg.assistant .meta").last).to_contain_text("tokens", timeout=20000)
        assert page.locator(".msg.assistant .bubble").last.inner_text().strip()
        _screenshot(page, "chat_page_tiny_model.png")
        # a long answer, stopped by the user: the request is aborted on the server
        page.fill("#max-tokens", "240")
        page.fill("#prompt", "Go on, at length.")
        page.click("#send")
        page.wait_for_function("document.querySelectorAll('.msg.assistant .bubble')[1]?.textContent.length > 0")
        page.click("#stop")
        sync_api.expect(page.locator(".msg.assistant .meta").last).to_contain_text("stopped", timeout=10000)
        assert wait_until(lambda: engine_idle(llm), timeout=5), llm.engine.usage()
        assert not errors, errors
        page.close()
