"""The web playground at ``/``, end to end: the real server, and the page in a real Chromium.

* The plain tests need no browser: the page's bytes and headers over HTTP (``httpx``).
* The browser tests drive Debian's ``/usr/bin/chromium`` (headless, a fresh temporary
  profile) with Playwright; they are skipped, with the reason, only when it is not installed
  (``.ci/run`` installs it). Playwright never downloads a browser here.
* Every wait is bounded: Playwright's timeouts are set on each page, and every
  ``wait_for_*`` names its own.
"""

from __future__ import annotations

import os
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from conftest import ServerFactory, ServerProcess

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000  # the bound on any single wait in the browser
TOKEN = "playground-token"
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is not installed (apt-get install chromium)"
)


# --- without a browser ---------------------------------------------------------------------


def test_page_is_served_with_its_headers(server: ServerProcess) -> None:
    response = httpx.get(server.base_url + "/", timeout=5)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-cache"
    csp = response.headers["content-security-policy"]
    host = f"{server.host}:{server.port}"
    assert f"connect-src 'self' ws://{host} wss://{host};" in csp
    assert "default-src 'none'" in csp and "unsafe" not in csp
    assert response.text.startswith("<!doctype html>")
    assert "<title>wirechat playground</title>" in response.text
    assert int(response.headers["content-length"]) == len(response.content)


def test_head_answers_the_headers_only(server: ServerProcess) -> None:
    get = httpx.get(server.base_url + "/", timeout=5)
    head = httpx.head(server.base_url + "/", timeout=5)
    assert head.status_code == 200
    assert head.content == b""
    for name in ("content-type", "content-length", "content-security-policy", "cache-control"):
        assert head.headers[name] == get.headers[name]


def test_page_is_public_when_auth_is_on(server_factory: ServerFactory) -> None:
    srv = server_factory("--auth-provider", "static", env={"WORKER_AUTH_TOKEN": TOKEN})
    page = httpx.get(srv.base_url + "/", timeout=5)
    assert page.status_code == 200 and "wirechat playground" in page.text
    assert httpx.get(srv.base_url + "/v1/models", timeout=5).status_code == 401


def test_no_playground_leaves_slash_a_404(server_factory: ServerFactory) -> None:
    srv = server_factory("--no-playground")
    for response in (
        httpx.get(srv.base_url + "/", timeout=5),
        httpx.head(srv.base_url + "/", timeout=5),
    ):
        assert response.status_code == 404
    assert httpx.get(srv.base_url + "/", timeout=5).json()["error"]["code"] == "unknown_url"
    assert httpx.get(srv.base_url + "/health", timeout=5).status_code == 200


def test_chat_server_has_no_playground(server_factory: ServerFactory) -> None:
    srv = server_factory(command="chat-server")
    assert httpx.get(srv.base_url + "/", timeout=5).status_code == 404


# --- PNG, decoded with zlib alone ----------------------------------------------------------


def png_pixels(data: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, one bytes object per pixel) of an 8-bit RGB or RGBA PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, bytearray()
    width = height = bpp = 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
            assert depth == 8 and colour in (2, 6) and interlace == 0
            bpp = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(bytes(idat))
    stride = width * bpp
    prev = bytearray(stride)
    pixels: list[bytes] = []
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        # Undo the row's filter (PNG spec §9): 0 none, 1 sub, 2 up, 3 average, 4 Paeth.
        if kind == 1:
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif kind == 2:
            line = bytearray((x + b) & 0xFF for x, b in zip(line, prev, strict=True))
        elif kind in (3, 4):
            for i in range(stride):
                a = line[i - bpp] if i >= bpp else 0
                b = prev[i]
                if kind == 3:
                    line[i] = (line[i] + ((a + b) >> 1)) & 0xFF
                    continue
                c = prev[i - bpp] if i >= bpp else 0
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 0xFF
        pixels += [bytes(line[i : i + 3]) for i in range(0, stride, bpp)]
        prev = line
    return width, height, pixels


def ink(png: bytes) -> float:
    """The share of pixels that differ from the most common colour (the background)."""
    _, _, pixels = png_pixels(png)
    counts = Counter(pixels)
    assert len(counts) > 1, "a blank image"
    return 1 - counts.most_common(1)[0][1] / len(pixels)


# --- in Chromium ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        # launch() gives every browser a fresh temporary profile, deleted on close.
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, timeout=30_000
        )
        try:
            yield launched
        finally:
            launched.close()


class Tab:
    """One page of the playground, in its own browser context (its own storage)."""

    def __init__(self, page: Page, srv: ServerProcess) -> None:
        self.page = page
        self.srv = srv
        self.problems: list[str] = []
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message: Any) -> None:
        text = message.text
        if message.type == "error" and not text.startswith("Failed to load resource"):
            self.problems.append(text)  # a CSP violation, a script error
        elif "Content Security Policy" in text:
            self.problems.append(text)

    def open(self) -> None:
        self.page.goto(self.srv.base_url + "/", wait_until="load")

    def wait_models(self) -> list[str]:
        self.page.wait_for_selector("#model option[value=echo]", state="attached")
        return self.page.eval_on_selector_all("#model option", "os => os.map(o => o.value)")

    def send(self, text: str) -> None:
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self, timeout: float = WAIT_MS) -> None:
        self.page.wait_for_selector("body[data-state=idle]", state="attached", timeout=timeout)

    def wait_busy(self) -> None:
        self.page.wait_for_selector("body[data-state=busy]", state="attached")

    def assistant_texts(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "#log .msg.assistant .body", "bs => bs.map(b => b.textContent)"
        )

    def last_assistant(self) -> str:
        texts = self.assistant_texts()
        return texts[-1] if texts else ""

    def threads(self) -> list[str]:
        return self.page.eval_on_selector_all(
            "#threads li", "lis => lis.map(li => li.dataset.threadId)"
        )

    def active_thread(self) -> str:
        return self.page.get_attribute("#threads li.active", "data-thread-id") or ""


@pytest.fixture
def tab_factory(browser: Browser) -> Iterator[Any]:
    contexts = []
    tabs: list[Tab] = []

    def make(srv: ServerProcess) -> Tab:
        context = browser.new_context(viewport={"width": 1100, "height": 720})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        tab = Tab(page, srv)
        tabs.append(tab)
        return tab

    try:
        yield make
    finally:
        for context in contexts:
            context.close()
    for tab in tabs:
        assert tab.problems == []


@pytest.fixture
def tab(tab_factory: Any, server: ServerProcess) -> Tab:
    made: Tab = tab_factory(server)
    made.open()
    return made


@needs_chromium
def test_model_picker_lists_the_servers_models(tab: Tab, server: ServerProcess) -> None:
    listed = httpx.get(server.base_url + "/v1/models", timeout=5).json()["data"]
    assert tab.wait_models() == [m["id"] for m in listed]
    tab.page.wait_for_selector("#status[data-conn=open]")  # the /chat socket is up


@needs_chromium
def test_reply_streams_in_and_the_page_is_drawn(tab: Tab) -> None:
    tab.wait_models()
    tab.page.select_option("#model", "echo")
    log = tab.page.locator("#log")
    before = log.screenshot()
    words = [f"word{i}" for i in range(12)]
    tab.send("/slow 150 " + " ".join(words))
    tab.wait_busy()
    tab.page.wait_for_function(
        "() => (document.querySelector('#log .msg.assistant .body') || {}).textContent"
    )
    early = tab.last_assistant()
    tab.page.wait_for_selector("#log .msg.assistant.streaming")  # still streaming: a cursor
    tab.wait_idle()
    final = tab.last_assistant()
    assert final == " ".join(words)
    assert early and final.startswith(early) and len(early) < len(final), (early, final)
    assert tab.page.inner_text("#log .msg.assistant .meta").startswith("echo")
    assert tab.page.is_disabled("#stop") and not tab.page.is_disabled("#send")

    after = log.screenshot()
    assert after != before
    # The transcript is drawn: more of it is ink than when it only held the hint.
    assert ink(after) > ink(before) + 0.01


@needs_chromium
def test_tool_call_and_result_are_shown(tab: Tab) -> None:
    tab.wait_models()
    tab.page.check("#tool-calculator")
    tab.send('/tool calculator {"expression": "2 + 3 * 4"}')
    tab.page.wait_for_selector("#log .tool.ok")
    tab.wait_idle()
    card = tab.page.locator("#log .tool")
    assert card.count() == 1
    assert "calculator" in card.locator(".head").inner_text()
    assert card.locator(".state").inner_text() == "done"
    assert '"expression": "2 + 3 * 4"' in card.locator(".args").inner_text()
    assert card.locator(".result").inner_text() == "result: 14"
    assert tab.last_assistant() == "tool calculator returned: 14"
    # The card comes before the reply that used its result.
    order = tab.page.eval_on_selector_all(
        "#log > *", "els => els.map(e => e.classList.contains('tool') ? 'tool' : e.className)"
    )
    assert order == ["msg user", "tool", "msg assistant"]


@needs_chromium
def test_tool_call_is_shown_while_it_runs_and_failures_too(
    tab_factory: Any, server_factory: ServerFactory
) -> None:
    tests_dir = str(Path(__file__).resolve().parent)
    srv = server_factory("--tools", "faulty_tools:TOOLS", env={"PYTHONPATH": tests_dir})
    tab: Tab = tab_factory(srv)
    tab.open()
    tab.wait_models()
    tab.page.fill("#extra-tools", "slow, explode")
    tab.send('/tool slow {"seconds": 1.5}')
    running = tab.page.wait_for_selector("#log .tool:not(.ok):not(.failed)")
    assert running is not None and "running" in running.inner_text()
    tab.page.wait_for_selector("#log .tool.ok")
    tab.wait_idle()
    assert tab.page.inner_text("#log .tool .result") == "result: slept 1.5"

    tab.send('/tool explode {"reason": "on purpose"}')
    tab.page.wait_for_selector("#log .tool.failed")
    tab.wait_idle()
    failed = tab.page.inner_text("#log .tool.failed .result")
    assert failed.startswith("error:") and "on purpose" in failed


@needs_chromium
def test_stop_ends_the_stream_and_the_page_is_idle_again(tab: Tab) -> None:
    tab.wait_models()
    words = [f"w{i}" for i in range(30)]
    tab.send("/slow 150 " + " ".join(words))
    tab.page.wait_for_function(
        "() => (document.querySelector('#log .msg.assistant .body') || {}).textContent"
    )
    assert not tab.page.is_disabled("#stop")
    tab.page.click("#stop")
    tab.wait_idle(timeout=2_000)  # the whole reply would take 4.5 s
    stopped = tab.last_assistant()
    time.sleep(0.5)  # three more words' time: nothing may arrive
    assert tab.last_assistant() == stopped
    assert stopped and " ".join(words).startswith(stopped) and stopped != " ".join(words)
    assert tab.page.inner_text("#log .msg.notice") == "Generation stopped by user"
    assert tab.page.is_disabled("#stop") and not tab.page.is_disabled("#send")
    tab.send("after the stop")  # the socket still serves the next turn
    tab.wait_idle()
    assert tab.last_assistant() == "after the stop"


@needs_chromium
def test_threads_new_switch_and_history(tab: Tab) -> None:
    tab.wait_models()
    tab.send("first thread")
    tab.wait_idle()
    first = tab.active_thread()
    assert tab.page.inner_text("#threads li.active .thread-title") == "first thread"

    tab.page.click("#new-thread")
    second = tab.active_thread()
    assert second != first and tab.threads() == [second, first]
    assert tab.assistant_texts() == []
    tab.send("/history")
    tab.wait_idle()
    assert tab.last_assistant() == "history: 0 messages"

    tab.page.click(f"#threads li[data-thread-id='{first}'] button")
    assert tab.active_thread() == first
    assert tab.assistant_texts() == ["first thread"]  # its transcript is back
    tab.send("/history")
    tab.wait_idle()
    # The server sent the thread's stored messages to the model: "first thread" and its reply.
    assert tab.last_assistant() == "history: 2 messages"

    tab.page.reload()  # kept in this browser's storage
    tab.wait_models()
    assert set(tab.threads()) == {first, second}
    assert tab.assistant_texts() == ["first thread", "history: 2 messages"]


@needs_chromium
def test_token_is_asked_for_and_used(tab_factory: Any, server_factory: ServerFactory) -> None:
    srv = server_factory("--auth-provider", "static", env={"WORKER_AUTH_TOKEN": TOKEN})
    tab: Tab = tab_factory(srv)
    tab.open()
    tab.page.wait_for_selector("#auth.shown")
    assert tab.page.inner_text("#auth-note") == "This server needs a token."

    tab.page.fill("#token", "wrong")
    tab.page.press("#token", "Enter")
    tab.page.wait_for_function(
        "() => document.querySelector('#auth-note').textContent === 'This token was refused.'"
    )
    tab.page.fill("#token", TOKEN)
    tab.page.press("#token", "Enter")
    tab.wait_models()  # fetched with Authorization: Bearer
    tab.page.wait_for_selector("#status[data-conn=open]")  # /chat?api_key=...
    assert not tab.page.is_visible("#auth")
    tab.send("authenticated hello")
    tab.wait_idle()
    assert tab.last_assistant() == "authenticated hello"
    assert TOKEN not in srv.log()  # never logged, even though it rode in the query string
    assert re.search(r"/chat\b", srv.log())  # (the socket was logged, without its query)
