"""The chat app in a real browser: headless Chromium (Debian's `chromium`; Playwright's own
browser download cannot work here) driven by Playwright. Open the app, send a message, watch the
reply grow as it streams, stop it, import the unsafe preset and read the guard's report; close
tabs and see their replies stop. A screenshot is kept in out/test-artifacts/browser-chat.png.

Without Playwright or Chromium the test is skipped, unless TRIMTAB_REQUIRE_BROWSER=1 (CI sets
it): then it fails."""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from app_helpers import ENDLESS, free_port, record_streams, user, wait_until, write_long_tiny_model

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by missing_browser()
    expect = sync_playwright = None

REPO = Path(__file__).resolve().parents[1]
UNSAFE = REPO / "presets" / "unsafe" / "seed-unsafe.yaml"
SCREENSHOT = REPO / "out" / "test-artifacts" / "browser-chat.png"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def starts(text: str) -> re.Pattern:
    return re.compile("^" + re.escape(text))


def chromium_path() -> str | None:
    found = shutil.which("chromium")
    if found:
        return found
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


def missing_browser() -> str | None:
    """Why the browser test cannot run here, or None."""
    if sync_playwright is None:
        return "the Python package playwright is not installed (pip install playwright; no browser download needed)"
    if importlib.util.find_spec("gradio") is None:
        return "gradio is not installed (pip install 'trimtab[app]')"
    if chromium_path() is None:
        return "no chromium executable on PATH or at /usr/bin/chromium (Debian: apt-get install chromium)"
    return None


@pytest.fixture(scope="module")
def chromium():
    why = missing_browser()
    if why:
        if os.environ.get("TRIMTAB_REQUIRE_BROWSER") == "1":
            pytest.fail(f"TRIMTAB_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    return chromium_path()


@pytest.fixture(scope="module")
def app(chromium, tmp_path_factory):
    """The app over a tiny model, opening on a preset whose replies run until Stop (guard off)."""
    from trimtab.backend.presets import write_preset
    from trimtab.plugin import gradio_app
    from trimtab.plugin.chat_engine import ChatEngine

    root = tmp_path_factory.mktemp("browser-app")
    engine = ChatEngine()
    engine.load(str(write_long_tiny_model(root / "model")))
    endless = write_preset(ENDLESS, root / "endless.yaml")
    demo = gradio_app.launch(engine, port=free_port(), prevent_thread_lock=True, quiet=True,
                             preset=str(endless), guard="off")
    yield SimpleNamespace(url=demo.local_url, engine=engine)
    demo.close()


@pytest.fixture(scope="module")
def browser(chromium):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, app):
    """A fresh tab on the app (its own session), with the model shown as loaded; page errors fail the test."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(app.url)
    expect(page.locator("#model-status textarea")).to_have_value(starts("loaded: "))
    yield page
    if not page.is_closed():
        page.close()
    assert errors == []


def send(page, text: str):
    """Send a message and wait until the reply has been seen growing; → the bot message's locator."""
    page.locator("#message textarea").fill(text)
    page.locator("#send-button").click()
    bot = page.locator('#chatbot [data-testid="bot"]').last
    expect(bot).not_to_have_text("")
    first = bot.inner_text()
    expect(bot).not_to_have_text(first)  # it grew: the reply streams
    later = bot.inner_text()
    assert later.startswith(first.rstrip()) and len(later) > len(first)
    expect(page.locator("#reply-info textarea")).to_have_value(starts("writing…"))
    return bot


def test_chat_streams_stops_and_shows_the_guards_report(page):
    bot = send(page, "w7 w8")
    page.locator("#stop-button").click()
    expect(page.locator("#reply-info textarea")).to_have_value(starts("stopped: cancelled, "))
    stopped = bot.inner_text()
    assert stopped and page.locator('#chatbot [data-testid="bot"]').last.inner_text() == stopped  # it stays

    page.locator("#preset-import input[type=file]").set_input_files(str(UNSAFE))
    report = page.locator("#preset-report textarea")
    expect(report).to_have_value(starts("seed-unsafe.yaml (imported): checked for the loaded model"))
    text = report.input_value()
    assert "repetition_penalty: 1.15: changed to 1.01 because" in text
    assert "ban_eos_token: true: changed to false because" in text
    expect(page.locator("#preset-choice input")).to_have_value("seed-unsafe.yaml (imported)")

    SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)


@pytest.fixture
def started(app, monkeypatch):
    return record_streams(app.engine.model, monkeypatch)


def test_closing_the_tab_stops_its_reply(page, started):
    send(page, "w9 w10")
    page.close()
    ((_, endless),) = started
    wait_until(lambda: endless.completion is not None, "the closed tab's reply to end")
    assert endless.completion.finish_reason == "cancelled"  # by itself it would run ~60k tokens


def test_closing_a_tab_whose_reply_waits_in_line_drops_that_reply(browser, app, page, started, monkeypatch):
    from trimtab.plugin.app_session import ChatSession

    stopped = []
    real_stop = ChatSession.stop
    monkeypatch.setattr(ChatSession, "stop", lambda self: stopped.append(self) or real_stop(self))
    send(page, "w11")  # this tab's endless reply holds the engine
    waiting = browser.new_page()
    waiting.goto(app.url)
    waiting.locator("#message textarea").fill("w12")
    waiting.locator("#send-button").click()
    expect(waiting.locator("#reply-info textarea")).to_have_value(starts("waiting for the model"))
    wait_until(lambda: app.engine.pending() == 1, "the second tab's reply to queue")
    waiting.close()
    wait_until(lambda: stopped, "the closed tab's session to be stopped")
    page.locator("#stop-button").click()
    expect(page.locator("#reply-info textarea")).to_have_value(starts("stopped: cancelled, "))
    app.engine.submit(user("w13"), preset={"max_new_tokens": 2}).wait()  # FIFO: when this is done, w12 has had its turn
    assert [prompt for prompt, _ in started] == ["w11", "w13"]  # w12 never reached the model
