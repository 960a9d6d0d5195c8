"""The web UI in a real headless Chromium, against the real daemon and model, with the internet fenced off."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from boards import board_tree
from conftest import free_port, http, private_state, running_daemon, start_daemon, wait_for
from gguf_factory import gguf_bytes, write_gguf

sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium package is not installed (.ci/setup installs it)", allow_module_level=True)

# Chromium still calls Google (updates, accounts) with these flags, so every non-loopback connection goes to the fence.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-extensions", "--proxy-bypass-list=127.0.0.1"]
PHONE = {"width": 360, "height": 740}
WAIT_MS = 120_000  # CPU is shared with other tests: a short answer can still take a while


class Fence:
    """Stands where the internet would be: records what the browser tries to reach and answers nothing."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.attempts: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(2)
                try:
                    self.attempts.append(conn.recv(512).split(b"\r\n")[0].decode(errors="replace"))
                except OSError:
                    pass


@dataclass
class Visit:
    """One page of the UI, with what it logged and every request it made."""
    page: sync_api.Page
    origin: str
    console: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)

    def errors(self, expected: tuple[str, ...] = ()) -> list[str]:
        return [m for m in self.console if not any(e in m for e in expected)]

    def outside(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(self.origin + "/")]

    def send(self, text: str) -> None:
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def tab(self, name: str) -> None:
        self.page.click(f'.tab[data-tab="{name}"]')


@pytest.fixture(scope="module")
def browser():
    fence = Fence()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=[*FLAGS, f"--proxy-server=http://127.0.0.1:{fence.port}"])
        yield b
        b.close()
    fence.sock.close()


@pytest.fixture
def open_ui(browser, tmp_path):
    """Open the UI of a daemon in a fresh browser context (empty localStorage); screenshots land in tmp_path."""
    contexts = []

    def open_(url: str, viewport: dict | None = None, storage: dict | None = None) -> Visit:
        context = browser.new_context(viewport=viewport or {"width": 1100, "height": 800})
        contexts.append(context)
        if storage:
            context.add_init_script("if (!sessionStorage.seeded) { sessionStorage.seeded = 1; "
                                    + "".join(f"localStorage.setItem({json.dumps(k)}, {json.dumps(json.dumps(v))});"
                                              for k, v in storage.items()) + "}")
        page = context.new_page()
        page.set_default_timeout(30_000)
        visit = Visit(page, url)
        page.on("console", lambda m: m.type in ("error", "warning") and visit.console.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: visit.console.append(f"uncaught: {e}"))
        page.on("request", lambda r: visit.requests.append(r.url))
        page.goto(url + "/")
        return visit

    yield open_
    for context in contexts:
        context.close()


def last_answer(visit: Visit) -> str:
    return visit.page.inner_text(".msg.assistant:last-of-type .body")


def overflowing(visit: Visit, width: int) -> list[str]:
    """Elements that stick out past the viewport (code blocks scroll inside themselves, so their insides count not)."""
    return visit.page.evaluate("""(width) => {
        const out = [];
        if (document.documentElement.scrollWidth > width) out.push('page ' + document.documentElement.scrollWidth);
        for (const e of document.querySelectorAll('body *')) {
            if (e.closest('pre') && e.tagName !== 'PRE') continue;
            const r = e.getBoundingClientRect();
            if (r.width && (r.right > width + 0.5 || r.left < -0.5)) out.push(`${e.tagName}.${e.className} ${r.right}`);
        }
        return out;
    }""", width)


def test_the_page_loads_from_the_box_alone_with_a_strict_policy_and_no_console_errors(daemon, open_ui):
    status, headers, body = http("GET", f"{daemon.url}/")
    assert status == 200 and b'<script src="/ui/app.js"' in body and b"<script>" not in body
    policy = headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and headers["X-Content-Type-Options"] == "nosniff"
    assert http("GET", f"{daemon.url}/ui/__init__.py")[0] == 404

    visit = open_ui(daemon.url)
    visit.page.wait_for_selector("#link.up")
    visit.page.wait_for_selector("#model option[value='gemma3-270m']", state="attached")
    visit.page.wait_for_timeout(2500)  # at least one more status snapshot
    status, _, body = http("GET", f"{daemon.url}/api/v1/peers")
    # a build without the peers capability answers 404, which Chromium logs; the UI then shows no peers tab
    assert visit.errors(expected=("status of 404",) if status == 404 else ()) == []
    assert visit.outside() == [] and f"{daemon.url}/api/v1/events" in visit.requests
    has_peers = status == 200 and bool(json.loads(body).get("enabled") or json.loads(body).get("peers"))
    assert visit.page.is_visible('.tab[data-tab="peers"]') == has_peers, "a peers tab exactly when there are peers"


def counting(n: int) -> dict:
    """A stored conversation of counting: the small base model then counts on for a long while when asked."""
    count = ", ".join(str(i) for i in range(1, n + 1))
    return {"id": "counting", "title": "Counting", "model": "gemma3-270m", "messages": [
        {"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": count},
        {"role": "user", "content": f"Count to {n}."}, {"role": "assistant", "content": count}]}


def test_a_chat_streams_the_models_answer_as_it_is_generated_and_shows_its_speed(daemon, open_ui, tmp_path):
    visit = open_ui(daemon.url, storage={"offgrid.conversations": [counting(40)], "offgrid.current": "counting"})
    visit.page.wait_for_selector("#link.up")
    # Record the answer's length each time the page paints it: streaming shows up as several growing lengths. A
    # long answer is asked for, as the daemon sends the text of up to 50 ms of tokens in one event.
    visit.page.evaluate("""() => { window.lengths = []; window.stopShown = false;
        new MutationObserver(() => { const b = document.querySelector('.msg.assistant:last-of-type .body');
            if (b) window.lengths.push(b.textContent.length);
            if (document.getElementById('stop').offsetParent !== null) window.stopShown = true; })
        .observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    footers = visit.page.evaluate("() => document.querySelectorAll('.msg.assistant footer').length")
    visit.send("Count to 100.")
    visit.page.wait_for_function("(n) => document.querySelectorAll('.msg.assistant footer').length > n",
                                 arg=footers, timeout=WAIT_MS)
    answer = last_answer(visit)
    assert answer.strip()
    growing = sorted({n for n in visit.page.evaluate("window.lengths") if 0 < n < len(answer)})
    assert len(growing) >= 2, f"the answer appeared at once, not streamed: {growing} of {len(answer)} characters"
    assert visit.page.evaluate("window.stopShown"), "the stop button never showed while generating"
    footer = visit.page.inner_text(".msg.assistant:last-of-type footer")
    assert "tokens/s" in footer and "tokens/s" in visit.page.inner_text("#speed")
    assert visit.page.is_visible("#send") and not visit.page.is_visible("#stop")
    visit.page.screenshot(path=tmp_path / "chat-desktop.png")

    visit.page.reload()  # conversations live on the box
    visit.page.wait_for_selector(".msg.assistant")
    assert last_answer(visit) == answer
    asked = visit.page.eval_on_selector_all(".msg.user .body", "els => els.map(e => e.textContent)")
    assert asked[-1] == "Count to 100."
    kept = visit.page.eval_on_selector("#conversation", "s => s.options.length")
    visit.page.click("#new-chat")
    assert visit.page.query_selector(".msg") is None
    assert visit.page.eval_on_selector("#conversation", "s => s.options.length") == kept + 1  # and a new one
    assert visit.page.evaluate("localStorage.getItem('offgrid.conversations')") is None  # moved to the box, once
    assert visit.errors() == [] and visit.outside() == []


def test_a_conversation_from_one_device_is_found_on_another(daemon, open_ui):
    phone = open_ui(daemon.url, viewport=PHONE)
    phone.page.wait_for_selector("#link.up")
    phone.send("Where do otters sleep?")
    phone.page.wait_for_selector(".msg.assistant footer", timeout=WAIT_MS)

    def kept() -> dict | None:
        listed = json.loads(http("GET", f"{daemon.url}/api/v1/conversations")[2])["conversations"]
        return next((c for c in listed if c["title"] == "Where do otters sleep?" and c["message_count"] >= 2), None)

    conversation = wait_for(kept, timeout=30, what="the box keeping the phone's exchange")
    laptop = open_ui(daemon.url)  # another browser: nothing in its localStorage
    laptop.page.wait_for_selector("#link.up")
    laptop.page.fill("#history-search", "otters sleep")
    laptop.page.press("#history-search", "Enter")
    laptop.page.wait_for_selector("#search-results mark")
    assert "otters" in laptop.page.inner_text("#search-results mark").lower()
    laptop.page.click("#search-results button")
    laptop.page.wait_for_function("(id) => localStorage.getItem('offgrid.current') === JSON.stringify(id)",
                                  arg=conversation["id"], timeout=WAIT_MS)
    laptop.page.wait_for_selector(".msg.user", timeout=WAIT_MS)
    assert laptop.page.inner_text(".msg.user .body") == "Where do otters sleep?"
    assert laptop.page.inner_text(".msg.assistant .body") == last_answer(phone)
    laptop.page.click("#forget-chat")
    laptop.page.wait_for_function("""() => ![...document.querySelectorAll('#conversation option')]
        .some((o) => o.textContent === 'Where do otters sleep?')""")
    laptop.page.fill("#history-search", "otters")
    laptop.page.press("#history-search", "Enter")
    laptop.page.wait_for_selector("#search-results li.muted")  # deleted on the box: gone for every device
    assert phone.errors() == [] and laptop.errors() == [] and laptop.outside() == []


def test_stop_ends_a_generation_and_the_daemon_stops_generating(daemon, open_ui):
    visit = open_ui(daemon.url, storage={"offgrid.conversations": [counting(40)], "offgrid.current": "counting"})
    visit.page.wait_for_selector("#link.up")
    try:
        before = daemon.metric("offgridd_requests_abandoned_total", model="gemma3-270m")
    except KeyError:
        before = 0
    visit.send("Count to 400.")
    visit.page.wait_for_function("() => document.querySelector('.msg.assistant:last-of-type .body').textContent",
                                 timeout=WAIT_MS)
    visit.page.click("#stop")
    visit.page.wait_for_selector("#send", state="visible")
    assert "stopped" in visit.page.inner_text(".msg.assistant:last-of-type footer")
    assert last_answer(visit).strip()
    deadline = time.monotonic() + 30  # the worker reports the abandoned generation when it has stopped
    while daemon.metric("offgridd_requests_abandoned_total", model="gemma3-270m") == before:
        assert time.monotonic() < deadline, "the daemon did not stop generating"
        time.sleep(0.2)
    assert visit.errors() == []


def test_the_status_panel_shows_the_model_and_updates_live_without_reloading(daemon, open_ui):
    visit = open_ui(daemon.url)
    visit.tab("status")
    visit.page.wait_for_function("() => document.getElementById('status-list').textContent.includes('gemma3-270m')")
    text = visit.page.inner_text("#status-list")
    assert "ready" in text and "Memory" in text and "Uptime" in text and "Version" in text
    visit.page.evaluate("window.notReloaded = true")
    uptime = visit.page.inner_text("#status-list dt:text-is('Uptime') + dd")
    visit.page.wait_for_function("(u) => document.querySelector('#status-list').textContent.indexOf(u) < 0",
                                 arg=uptime, timeout=10_000)
    assert visit.page.evaluate("window.notReloaded") is True
    assert "serving gemma3-270m" in visit.page.inner_text("#status-line")
    assert visit.errors() == []


def test_model_output_is_shown_as_text_never_run_as_html(daemon, open_ui):
    hostile = ('<img src=x onerror="window.pwned=1"><script>window.pwned=2</script> use `ls -l` here:\n'
               "```python\nprint('<b>hi</b>')\n```\nafter")
    conversation = {"id": "x", "title": "hostile", "model": "", "messages": [
        {"role": "user", "content": "show me"}, {"role": "assistant", "content": hostile}]}
    visit = open_ui(daemon.url, storage={"offgrid.conversations": [conversation], "offgrid.current": "x"})
    visit.page.wait_for_selector(".msg.assistant")
    assert visit.page.query_selector("#messages img, #messages script, #messages b") is None
    assert visit.page.evaluate("window.pwned") is None
    assert '<img src=x onerror="window.pwned=1">' in last_answer(visit)
    assert visit.page.inner_text(".msg.assistant pre.code code") == "print('<b>hi</b>')"
    assert visit.page.inner_text(".msg.assistant p code") == "ls -l"
    assert visit.errors() == [] and visit.outside() == []


def test_at_phone_width_nothing_overflows(daemon, open_ui, tmp_path):
    long_code = "```sh\n" + "curl http://box:11611/v1/chat/completions -d " + "x" * 200 + "\n```"
    conversation = {"id": "w", "title": "a very long title " * 8, "model": "", "messages": [
        {"role": "user", "content": "a" * 300}, {"role": "assistant", "content": "word " * 50 + long_code}]}
    visit = open_ui(daemon.url, viewport=PHONE, storage={"offgrid.conversations": [conversation],
                                                         "offgrid.current": "w"})
    visit.page.wait_for_selector("#link.up")
    visit.page.wait_for_selector("#model option", state="attached")
    assert overflowing(visit, PHONE["width"]) == []
    visit.page.screenshot(path=tmp_path / "chat-phone.png")
    for name in ("status", "models"):
        visit.tab(name)
        visit.page.wait_for_selector(f"#{name} .facts dd, #{name} .card")
        assert overflowing(visit, PHONE["width"]) == [], name
        visit.page.screenshot(path=tmp_path / f"{name}-phone.png")
    assert (tmp_path / "chat-phone.png").stat().st_size > 0
    assert visit.errors() == [] and visit.outside() == []


def test_the_keyboard_alone_reaches_every_control(daemon, open_ui):
    visit = open_ui(daemon.url)
    visit.page.wait_for_selector("#link.up")
    reached = set()
    for _ in range(30):
        visit.page.keyboard.press("Tab")
        reached.add(visit.page.evaluate("document.activeElement.id || document.activeElement.dataset.tab || ''"))
    assert {"chat", "status", "models", "keys", "model", "conversation", "new-chat", "prompt", "send"} <= reached
    visit.page.focus('.tab[data-tab="status"]')
    visit.page.keyboard.press("Enter")
    assert visit.page.is_visible("#status") and not visit.page.is_visible("#chat")


def wait_without_model(daemon, timeout: float = 60) -> None:
    """Wait until a daemon started with a missing model answers, serving without one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if daemon.health()[1]["status"] == "unavailable":
                return
        except OSError:
            pass
        assert daemon.proc.poll() is None, daemon.log.read_text()
        time.sleep(0.2)
    raise TimeoutError(f"the daemon did not come up without a model:\n{daemon.log.read_text()}")


def _linked_state(model_state: Path, tmp_path: Path) -> Path:
    return private_state(model_state, tmp_path / "state")


def test_keys_are_asked_for_and_deleting_a_model_needs_the_admin_key(model_state, tmp_path, open_ui):
    from offgridd.store import ModelStore

    state = _linked_state(model_state, tmp_path)
    ModelStore(state / "models").import_file(write_gguf(tmp_path / "extra.gguf"), name="extra")
    keys = {"OFFGRID_API_KEY": "lan", "OFFGRID_ADMIN_KEY": "owner"}
    with running_daemon(state, tmp_path / "daemon.log", env=keys) as daemon:
        visit = open_ui(daemon.url)
        visit.page.wait_for_selector("#key-dialog[open]")
        assert "API key" in visit.page.inner_text("#key-title")
        visit.page.fill("#key-input", "lan")
        visit.page.press("#key-input", "Enter")
        visit.page.wait_for_selector("#link.up")
        visit.tab("models")
        visit.page.wait_for_selector('[data-model="extra"]')
        visit.page.click('[data-model="extra"] button.danger')
        visit.page.wait_for_selector("#confirm-dialog[open]")
        visit.page.click("#confirm-form button[type=submit]")
        visit.page.wait_for_selector("#key-dialog[open]")
        assert "Admin key" in visit.page.inner_text("#key-title")
        visit.page.fill("#key-input", "owner")
        visit.page.press("#key-input", "Enter")
        visit.page.wait_for_selector('[data-model="extra"]', state="detached")
        assert not (state / "models" / "manifests" / "extra.json").exists()
        assert visit.page.is_visible('[data-model="gemma3-270m"]')
        assert visit.page.evaluate("localStorage.getItem('offgrid.apiKey')") == '"lan"'
        failed = [m for m in visit.console if "Failed to load resource" in m]
        assert failed and all("401" in m or "403" in m for m in failed), failed
        assert visit.errors(expected=("status of 401", "status of 403")) == []
        assert visit.outside() == []
    assert daemon.blocked_loop_reports() == []


def test_a_box_that_cannot_answer_says_why_and_the_page_reconnects_after_a_restart(model_state, tmp_path, open_ui):
    state = _linked_state(model_state, tmp_path)
    port = free_port()
    # A board with too little memory for any model: the daemon serves without one and answers chat with 503.
    env = {"OFFGRID_HARDWARE_ROOT": str(board_tree(tmp_path / "root", "pi4-2gb", available_fraction=0.1))}
    daemon = start_daemon(state, tmp_path / "daemon.log", port=port, env=env)
    try:
        wait_without_model(daemon)
        visit = open_ui(daemon.url, viewport=PHONE)
        visit.page.wait_for_selector("#link.up")
        visit.send("hello")
        visit.page.wait_for_selector(".msg.error")
        assert "cannot answer now" in visit.page.inner_text(".msg.error")
        assert "smaller quantization" in visit.page.inner_text("#banner-text")
        visit.tab("status")
        assert "unavailable" in visit.page.inner_text("#status-list")

        daemon.stop()
        visit.page.wait_for_selector("#link.down", timeout=15_000)
        assert "Connection to the appliance lost" in visit.page.inner_text("#banner-text")
        daemon = start_daemon(state, tmp_path / "daemon2.log", port=port, env=env)
        visit.page.wait_for_selector("#link.up", timeout=60_000)
        assert not visit.page.is_visible("#banner")
        expected = ("status of 503", "ERR_CONNECTION_REFUSED", "ERR_EMPTY_RESPONSE", "ERR_CONNECTION_RESET",
                    "ERR_INCOMPLETE_CHUNKED_ENCODING")
        assert visit.errors(expected=expected) == []
        assert visit.outside() == []
    finally:
        daemon.stop()
    assert daemon.blocked_loop_reports() == []


def _identity(state: Path, name: str, key: bytes) -> None:
    fleet = pytest.importorskip("offgridd.peers.fleet", reason="this build has no peers capability")
    fleet.save_identity(state, fleet.NodeIdentity(node_id=secrets.token_hex(16), name=name, fleet_key=key))


def _udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_peers_tab_shows_the_other_boxes_with_their_models_and_load(model_state, tmp_path, open_ui):
    key = secrets.token_bytes(32)
    udp = {"hall": _udp_port(), "barn": _udp_port()}
    daemons = {}
    try:
        for name, other in (("hall", "barn"), ("barn", "hall")):
            state = _linked_state(model_state, tmp_path / name)
            _identity(state, name, key)
            env = {"OFFGRID_PEERS_ENABLED": "true", "OFFGRID_PEERS_PORT": str(udp[name]),
                   "OFFGRID_PEERS_INTERVAL": "0.5", "OFFGRID_PEERS_INTERFACE": "127.0.0.1",
                   "OFFGRID_PEERS_STATIC": f"127.0.0.1:{udp[other]}"}
            # no model to load: the peers work without one, and two loads at once would starve the CPU
            daemons[name] = start_daemon(state, tmp_path / f"{name}.log", "--model", "missing", env=env)
            wait_without_model(daemons[name])
        visit = open_ui(daemons["hall"].url, viewport=PHONE)
        visit.page.wait_for_selector('.tab[data-tab="peers"]', timeout=60_000)
        visit.tab("peers")
        card = visit.page.wait_for_selector('[data-peer="barn"]', timeout=60_000)
        text = card.inner_text()
        assert "gemma3-270m" in text and "load" in text and "127.0.0.1" in text
        assert "This box: hall" in visit.page.inner_text("#this-box")
        assert overflowing(visit, PHONE["width"]) == []

        daemons.pop("barn").stop()  # a box that goes silent leaves the list
        visit.page.wait_for_selector('[data-peer="barn"]', state="detached", timeout=60_000)
        assert visit.page.is_visible("#no-peers")
        assert visit.errors() == [] and visit.outside() == []
    finally:
        for daemon in daemons.values():
            daemon.stop()
    for daemon in daemons.values():
        assert daemon.blocked_loop_reports() == []


def test_a_usb_import_shows_its_progress_and_the_new_model_appears(model_state, tmp_path, open_ui):
    name = "ui-import"
    stick = tmp_path / "stick"
    stick.mkdir()
    data = gguf_bytes(tensors=64, elements=1 << 18)  # 64 MB: long enough to report progress
    (stick / f"{name}.gguf").write_bytes(data)
    (stick / f"{name}.gguf.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  {name}.gguf\n")
    daemon = start_daemon(_linked_state(model_state, tmp_path), tmp_path / "daemon.log", "--model", "missing")
    try:
        wait_without_model(daemon)
        if http("GET", f"{daemon.url}/api/v1/usb")[0] == 404:
            pytest.skip("this build has no USB import")
        visit = open_ui(daemon.url)
        visit.page.wait_for_selector("#link.up")
        visit.tab("models")
        visit.page.wait_for_selector('[data-model="gemma3-270m"]')
        visit.page.evaluate("""() => { window.jobStates = [];
            new MutationObserver((records) => { for (const r of records) for (const n of r.addedNodes)
                if (n.classList?.contains('job')) window.jobStates.push(`${n.className} ${n.textContent}`);
            }).observe(document.getElementById('job-list'), {childList: true}); }""")
        status, _, body = http("POST", f"{daemon.url}/api/v1/usb/import", {"path": str(stick)}, timeout=120)
        assert status == 200, body
        card = visit.page.wait_for_selector(f'[data-model="{name}"]', timeout=30_000)
        assert "MB" in card.inner_text()
        visit.page.wait_for_selector(".job.done")
        states = visit.page.evaluate("window.jobStates")
        assert any(s.startswith("card job running") and name in s for s in states), states
        assert any(s.startswith("card job done") and name in s for s in states), states
        assert "imported ui-import" in visit.page.inner_text("#usb-line")
        assert visit.errors() == [] and visit.outside() == []
    finally:
        daemon.stop()
    assert daemon.blocked_loop_reports() == []
