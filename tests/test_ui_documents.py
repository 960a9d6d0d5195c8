"""Documents in the web UI, in a real headless Chromium against the real daemon and model (internet fenced off):
uploads from the page, a chat answered from a collection with its sources, deleting, and the admin key uploads need."""

from __future__ import annotations

import json
import uuid
from urllib.parse import quote_plus

import pytest
import test_ui
from conftest import http, private_state, running_daemon, start_daemon
from documents_bench import pdf_of
from test_ui import PHONE, WAIT_MS, Visit, overflowing, wait_without_model

browser, open_ui = test_ui.browser, test_ui.open_ui  # the fixtures of test_ui: a fenced-off Chromium, a fresh page

ADMIN = "owner"  # the module's daemon has an admin key: uploads and deletes need it, reading and chat do not
OWNER = {"offgrid.adminKey": ADMIN}
WATER = ("# Water\n\nBoil water for one full minute before drinking it. At altitudes above 2,000 metres boil it for "
         "three minutes. Let it cool in a covered pot.\n")
RADIO = ["The hand-crank radio receives AM, FM and the weather band. Keep it dry.",
         "To charge the battery of the hand-crank radio, turn the crank for three minutes: that gives about "
         "twenty minutes of listening. A full charge from the solar panel takes eight hours of sun."]



def multipart(collection: str, name: str, data: bytes) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="collection"\r\n\r\n{collection}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}", "Authorization": f"Bearer {ADMIN}"}


def upload(url: str, collection: str, name: str, data: bytes) -> tuple[int, dict]:
    """An upload through the API, as another device or a script would make it."""
    status, _, raw = http("POST", f"{url}/api/v1/documents", *multipart(collection, name, data), timeout=300)
    return status, json.loads(raw)


def listed(url: str, collection: str | None = None) -> list[dict]:
    query = f"?collection={collection}" if collection else ""
    status, _, raw = http("GET", f"{url}/api/v1/documents{query}")
    assert status == 200, raw
    return json.loads(raw)["documents"]


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@pytest.fixture(scope="module")
def box(model_state, tmp_path_factory):
    """One daemon for this module, with a store of documents of its own and an admin key."""
    tmp = tmp_path_factory.mktemp("ui-documents")
    with running_daemon(private_state(model_state, tmp / "state"), tmp / "daemon.log",
                        env={"OFFGRID_ADMIN_KEY": ADMIN}) as daemon:
        yield daemon


def watch_uploads(visit: Visit) -> None:
    """Record each upload's state as the page shows it, and how many were being read at once."""
    visit.page.evaluate("""() => { window.uploadStates = []; window.mostBusy = 0;
        new MutationObserver(() => {
            for (const s of document.querySelectorAll('#upload-list .state')) {
                const line = s.closest('[data-upload]').dataset.upload + ': ' + s.textContent;
                if (window.uploadStates.at(-1) !== line) window.uploadStates.push(line);
            }
            window.mostBusy = Math.max(window.mostBusy, document.querySelectorAll('.upload.busy').length);
        }).observe(document.getElementById('upload-list'), {childList: true, subtree: true, characterData: true,
                                                            attributes: true}); }""")


def test_markdown_and_a_pdf_uploaded_from_the_page_are_listed_with_their_pages_and_a_refused_file_adds_nothing(
        box, open_ui, tmp_path):
    # the first test of the module: its daemon has no documents yet
    (tmp_path / "water.md").write_text(WATER)
    (tmp_path / "radio.pdf").write_bytes(pdf_of(RADIO))
    visit = open_ui(box.url, storage=OWNER)
    visit.page.wait_for_selector("#link.up")
    visit.tab("documents")
    visit.page.wait_for_selector("#no-documents", state="visible")
    assert "No documents yet. Upload a manual" in visit.page.inner_text("#no-documents")
    assert visit.page.input_value("#upload-collection") == "default"

    watch_uploads(visit)
    visit.page.fill("#upload-collection", "kit")
    visit.page.set_input_files("#upload-files", [tmp_path / "water.md", tmp_path / "radio.pdf"])
    visit.page.click("#upload")
    visit.page.wait_for_function("() => document.querySelectorAll('.upload.added').length === 2", timeout=WAIT_MS)

    documents = {d["filename"]: d for d in listed(box.url, "kit")}
    assert {n: d["pages"] for n, d in documents.items()} == {"water.md": 1, "radio.pdf": 2}
    for name, d in documents.items():
        state = visit.page.inner_text(f'[data-upload="{name}"] .state')
        assert state == f"added: {plural(d['pages'], 'page')}, {plural(d['chunks'], 'chunk')}"
        card = visit.page.inner_text(f'[data-collection="kit"] [data-document="{d["id"]}"]')
        assert name in card and plural(d["pages"], "page") in card and plural(d["chunks"], "chunk") in card
        assert d["kind"] in card and "added" in card
    states = visit.page.evaluate("window.uploadStates")
    for name in documents:  # each showed that it was being read, then what was added
        mine = [s for s in states if s.startswith(name + ": ")]
        assert mine[0] == f"{name}: waiting…" or mine[0].startswith(f"{name}: uploading…"), mine
        assert any(s.startswith(f"{name}: uploading…") for s in mine) and mine[-1].startswith(f"{name}: added"), mine
    assert visit.page.evaluate("window.mostBusy") == 1, "uploads go one after another"
    assert "2 documents" in visit.page.inner_text('[data-collection="kit"] > p')
    assert not visit.page.is_visible("#no-documents")
    visit.page.wait_for_selector('#collection option[value="kit"]', state="attached")  # chat can use it now
    assert visit.page.eval_on_selector_all("#collection-names option", "os => os.map(o => o.value)") == ["kit"]

    # refused: a kind the box does not read, and binary data named as text; the page shows the box's reason
    (tmp_path / "tool.exe").write_bytes(b"MZ\x90\x00\x03\x00\x00\x00")
    (tmp_path / "notes.txt").write_bytes(b"\x00\x01\x02binary\x00")
    visit.page.set_input_files("#upload-files", [tmp_path / "tool.exe", tmp_path / "notes.txt"])
    visit.page.click("#upload")
    visit.page.wait_for_function("() => document.querySelectorAll('.upload.refused').length === 2", timeout=WAIT_MS)
    for name in ("tool.exe", "notes.txt"):
        status, refusal = upload(box.url, "kit", name, (tmp_path / name).read_bytes())
        assert status in (400, 415)
        assert visit.page.inner_text(f'[data-upload="{name}"] .state') == "refused: " + refusal["error"]["message"]
    assert "not '.exe' files" in visit.page.inner_text('[data-upload="tool.exe"] .state')
    assert sorted(d["filename"] for d in listed(box.url)) == ["radio.pdf", "water.md"]
    visit.page.screenshot(path=tmp_path / "documents-desktop.png")
    assert visit.page.locator("[data-document]").count() == 2
    failed = [m for m in visit.console if "Failed to load resource" in m]
    assert failed and all("400" in m or "415" in m for m in failed), failed
    assert visit.errors(expected=("status of 400", "status of 415")) == [] and visit.outside() == []


def test_a_chat_answered_from_a_collection_sends_it_and_shows_its_sources_by_file_and_page(box, open_ui, tmp_path):
    status, _ = upload(box.url, "field", "radio.pdf", pdf_of(RADIO))
    assert status in (201, 409)
    visit = open_ui(box.url, viewport=PHONE)
    sent = []
    visit.page.on("request", lambda r: r.url.endswith("/v1/chat/completions") and sent.append(r.post_data_json))
    visit.page.wait_for_selector("#link.up")
    visit.page.wait_for_selector('#collection option[value="field"]', state="attached")
    visit.page.select_option("#collection", "field")
    question = "How long do I turn the crank to charge the radio battery?"
    visit.send(question)
    visit.page.wait_for_selector(".msg.assistant .sources li", timeout=WAIT_MS)
    visit.page.wait_for_selector(".msg.assistant footer", timeout=WAIT_MS)

    assert len(sent) == 1 and sent[0]["offgrid"] == {"collection": "field"}
    assert sent[0]["messages"][-1] == {"role": "user", "content": question}
    # the same passages, in the same order, as the box finds for the question
    _, _, raw = http("GET", f"{box.url}/api/v1/documents/search?collection=field&q=" + quote_plus(question))
    passages = json.loads(raw)["passages"]
    shown = visit.page.eval_on_selector_all(".msg.assistant .sources summary", "ss => ss.map(s => s.textContent)")
    assert shown == [f"[{i}] {p['filename']}, page {p['page']}" for i, p in enumerate(passages, start=1)]
    assert "radio.pdf, page 2" in " ".join(shown)
    n = next(i for i, p in enumerate(passages, start=1) if p["page"] == 2)
    excerpt = visit.page.locator(f'.msg.assistant [data-source="{n}"] .excerpt')
    assert not excerpt.is_visible()
    visit.page.focus(f'.msg.assistant [data-source="{n}"] summary')  # by keyboard: a source opens with Enter
    visit.page.keyboard.press("Enter")
    assert excerpt.is_visible() and "turn the crank for three minutes" in excerpt.inner_text()
    assert overflowing(visit, PHONE["width"]) == []
    visit.page.screenshot(path=tmp_path / "sources-phone.png")

    # the choice is remembered, and the conversation reopens from the box with the sources it kept
    current = json.loads(visit.page.evaluate("localStorage.getItem('offgrid.current')"))
    visit.page.reload()
    visit.page.wait_for_selector(".msg.assistant", timeout=WAIT_MS)
    visit.page.wait_for_selector('#collection option[value="field"]', state="attached")
    assert visit.page.input_value("#collection") == "field"
    _, _, raw = http("GET", f"{box.url}/api/v1/conversations/{current}")
    kept = json.loads(raw)["messages"][-1]
    if kept.get("sources"):  # the box keeps a grounded answer's sources with it
        again = visit.page.eval_on_selector_all(".msg.assistant .sources summary", "ss => ss.map(s => s.textContent)")
        assert again == [f"[{i}] {s['file']}, page {s['page']}" for i, s in enumerate(kept["sources"], start=1)]
    assert visit.errors() == [] and visit.outside() == []


def test_deleting_a_document_through_the_page_removes_it_from_the_box(box, open_ui):
    status, document = upload(box.url, "attic", "old-notes.md", b"# Old notes\n\nThe shed key hangs by the door.\n")
    assert status == 201, document
    visit = open_ui(box.url, storage=OWNER)
    visit.page.wait_for_selector('#collection option[value="attic"]', state="attached")
    visit.tab("documents")
    card = f'[data-document="{document["id"]}"]'
    visit.page.click(f"{card} button.danger")
    visit.page.wait_for_selector("#confirm-dialog[open]")
    assert "old-notes.md" in visit.page.inner_text("#confirm-title")
    visit.page.click("#confirm-form button[type=submit]")
    visit.page.wait_for_selector(card, state="detached")
    assert all(d["id"] != document["id"] for d in listed(box.url))
    assert http("GET", f"{box.url}/api/v1/documents/{document['id']}")[0] == 404
    # its collection had no other document: it leaves the lists, the chat's choice among them
    visit.page.wait_for_selector('[data-collection="attic"]', state="detached")
    assert visit.page.locator('#collection option[value="attic"]').count() == 0
    assert visit.errors() == [] and visit.outside() == []


def test_an_upload_asks_for_the_admin_key_and_goes_on_with_it(box, open_ui, tmp_path):
    (tmp_path / "keyed.md").write_text("# Keyed\n\nThe gate code is written on the back of the map.\n")
    visit = open_ui(box.url)  # no saved keys: reading needs none here, uploading needs the admin key
    visit.page.wait_for_selector("#link.up")
    visit.tab("documents")
    visit.page.fill("#upload-collection", "keyed")
    visit.page.set_input_files("#upload-files", tmp_path / "keyed.md")
    visit.page.click("#upload")
    visit.page.wait_for_selector("#key-dialog[open]")
    assert "Admin key" in visit.page.inner_text("#key-title")
    assert visit.page.inner_text('[data-upload="keyed.md"] .state').startswith("uploading…")
    visit.page.fill("#key-input", ADMIN)
    visit.page.press("#key-input", "Enter")
    visit.page.wait_for_selector('[data-upload="keyed.md"].added', timeout=WAIT_MS)
    assert [d["filename"] for d in listed(box.url, "keyed")] == ["keyed.md"]
    assert visit.page.evaluate("localStorage.getItem('offgrid.adminKey')") == json.dumps(ADMIN)
    visit.page.wait_for_selector('[data-collection="keyed"] [data-document]')
    assert visit.errors(expected=("status of 403",)) == [] and visit.outside() == []


def test_the_documents_tab_fits_a_phone_and_the_keyboard_alone_reaches_its_controls(box, open_ui, tmp_path):
    status, _ = upload(box.url, "a collection with a long name for a narrow phone screen",
                       "a-manual-with-a-very-long-file-name-that-goes-on-and-on-" * 3 + ".md", b"# A\n\nwords\n")
    assert status in (201, 409)
    phone = open_ui(box.url, viewport=PHONE, storage=OWNER)
    phone.tab("documents")
    phone.page.wait_for_selector("[data-document]")
    phone.page.set_input_files("#upload-files", [])
    phone.page.fill("#doc-search", "words")
    phone.page.press("#doc-search", "Enter")
    phone.page.wait_for_selector("#doc-results li")
    assert overflowing(phone, PHONE["width"]) == []
    phone.page.screenshot(path=tmp_path / "documents-phone.png", full_page=True)

    visit = open_ui(box.url, storage=OWNER)
    visit.page.wait_for_selector("#link.up")
    visit.page.wait_for_selector('#collection option:not([value=""])', state="attached")
    reached = set()
    for _ in range(30):
        visit.page.keyboard.press("Tab")
        reached.add(visit.page.evaluate("document.activeElement.id || document.activeElement.dataset.tab || ''"))
    assert {"documents", "collection", "model", "prompt", "send"} <= reached
    visit.page.focus('.tab[data-tab="documents"]')
    visit.page.keyboard.press("Enter")
    assert visit.page.is_visible("#documents") and not visit.page.is_visible("#chat")
    visit.page.wait_for_selector("[data-document]")
    reached = []
    for _ in range(12):
        visit.page.keyboard.press("Tab")
        reached.append(visit.page.evaluate("document.activeElement.id || document.activeElement.textContent"))
    assert {"upload-files", "upload-collection", "upload", "Delete"} <= set(reached), reached
    assert phone.errors() == [] and visit.errors() == []


def test_with_documents_off_the_page_shows_no_documents_tab_and_no_choice_in_chat(model_state, tmp_path, open_ui):
    state = private_state(model_state, tmp_path / "state")
    # no model to load: the tab's absence needs none, and the CPU is shared
    daemon = start_daemon(state, tmp_path / "daemon.log", "--model", "missing",
                          env={"OFFGRID_DOCUMENTS_ENABLED": "false"})
    try:
        wait_without_model(daemon)
        assert http("GET", f"{daemon.url}/api/v1/documents")[0] == 503
        visit = open_ui(daemon.url, storage={"offgrid.tab": "documents", "offgrid.collection": "kit"})
        visit.page.wait_for_selector("#link.up")
        visit.page.wait_for_selector('.tab[data-tab="documents"]', state="hidden")
        assert visit.page.is_visible("#chat") and not visit.page.is_visible("#documents")
        assert not visit.page.is_visible("#collection-choice")
        assert visit.errors(expected=("status of 503",)) == [] and visit.outside() == []
    finally:
        daemon.stop()
    assert daemon.blocked_loop_reports() == []


def test_a_long_upload_shows_how_much_of_it_is_embedded_and_the_box_keeps_a_job_for_it(box, open_ui, tmp_path):
    pages = [f"Log page {i}: the pump at well {i} was primed, it ran for {i} minutes and the water ran clear."
             for i in range(48)]  # 48 chunks: six batches of the embedding model's work
    (tmp_path / "pump-log.txt").write_text("\f".join(pages))
    visit = open_ui(box.url, storage=OWNER)
    visit.page.wait_for_selector("#link.up")
    visit.tab("documents")
    watch_uploads(visit)
    visit.page.fill("#upload-collection", "logs")
    visit.page.set_input_files("#upload-files", [tmp_path / "pump-log.txt"])
    visit.page.click("#upload")
    visit.page.wait_for_function("() => document.querySelectorAll('.upload.added').length === 1", timeout=WAIT_MS)
    shown = [int(s.split("embedding… ")[1].split("%")[0]) for s in visit.page.evaluate("window.uploadStates")
             if "embedding… " in s]
    assert any(0 < share < 100 for share in shown), visit.page.evaluate("window.uploadStates")
    assert shown == sorted(shown)
    [job] = [j for j in json.loads(http("GET", f"{box.url}/api/v1/jobs")[2])["jobs"]
             if j["kind"] == "document-upload" and j["model"] == "pump-log.txt"]
    size = (tmp_path / "pump-log.txt").stat().st_size
    assert job["state"] == "done" and job["bytes_done"] == job["bytes_total"] == size
    assert "into collection 'logs'" in job["reason"] and "48 page(s)" in job["reason"]


def test_a_peers_collection_is_pulled_from_the_peers_tab_and_appears_in_documents(model_state, tmp_path, open_ui):
    from test_peers import fleet_state, start_peer, stop_all, udp_port

    key = uuid.uuid4().bytes * 2
    pa, pb = udp_port(), udp_port()
    a = start_peer(fleet_state(model_state, tmp_path, "hall", key), pa, [pb], OFFGRID_ADMIN_KEY=ADMIN)
    b = start_peer(fleet_state(model_state, tmp_path, "barn", key), pb, [pa])
    try:
        status, _ = upload(a.url, "kit", "water.md", WATER.encode())
        assert status == 201
        visit = open_ui(b.url, viewport=PHONE)
        visit.page.wait_for_selector('.tab[data-tab="peers"]', timeout=60_000)
        visit.tab("peers")
        row = visit.page.wait_for_selector('[data-peer="hall"] .peer-collection', timeout=60_000)
        assert row.inner_text().startswith("documents: kit (1)")
        visit.page.click('[data-peer="hall"] .peer-collection button')
        visit.page.wait_for_function(
            "() => document.querySelector('[data-peer=\"hall\"] .peer-collection [role=status]')"
            ".textContent.includes('added')", timeout=WAIT_MS)
        assert "1 added, 0 already here" in visit.page.inner_text('[data-peer="hall"] .peer-collection')
        assert [(d["collection"], d["filename"]) for d in listed(b.url)] == [("kit", "water.md")]
        visit.tab("documents")
        assert "water.md" in visit.page.wait_for_selector('[data-collection="kit"] [data-document]').inner_text()
        assert overflowing(visit, PHONE["width"]) == []
        assert visit.errors() == [] and visit.outside() == []
    finally:
        stop_all(a, b)
