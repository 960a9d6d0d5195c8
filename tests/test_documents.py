"""Documents with the real model: uploads embedded by the built-in model in a real inference worker, kept in a real
sqlite file, searched hybrid; the HTTP routes on the real app; recall@5 measured on the public field-guide set."""

from __future__ import annotations

import json
import time

import aiohttp
import documents_bench as bench
import msgpack
import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer
from conftest import private_state

from offgridd.api.app import init_app
from offgridd.daemon import build_runtime
from offgridd.db import Database, used_bytes
from offgridd.documents import (
    DocumentExists,
    DocumentNotFound,
    DocumentsFull,
    DocumentStore,
    DocumentTooLarge,
    InvalidDocument,
    Limits,
    ground,
)
from offgridd.documents.share import read_shared
from offgridd.settings import load_settings

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODEL = "gemma3-270m"
# measured on this machine's 2 shared cores (docs/documents.md): hybrid 1.0, vector 1.0, bm25 0.97 on 32 questions;
# the floors leave room for a different build of llama.cpp rounding differently
RECALL_FLOOR = {"hybrid": 0.85, "vector": 0.75, "bm25": 0.8}
WATER = "# Boiling\nBoil water for one minute to kill germs; three minutes above 2,000 metres."
BATTERY = "# Batteries\nTop up a flooded lead-acid battery with distilled water and charge it fully every week."


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embed(model_state, tmp_path_factory):
    """The built-in model's embeddings from a real worker; texts seen before are answered from memory, so the
    tests pay for each text once."""
    inference, _ = bench.embedding_inference(private_state(model_state, tmp_path_factory.mktemp("documents")),
                                             MODEL, threads=2)
    seen: dict[str, list[float]] = {}

    async def embed(texts: list[str]) -> list[list[float]]:
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, (await inference.embed(MODEL, new)).vectors, strict=True))
        return [seen[t] for t in texts]

    yield embed
    await inference.pool.stop()


@pytest_asyncio.fixture(loop_scope="module")
async def store(embed, tmp_path):
    db = Database(tmp_path / "offgridd.db")
    yield DocumentStore(db, embed, model=MODEL, limits=Limits(max_upload_bytes=1 << 20, max_total_bytes=4 << 20))
    db.close()


def rows(store: DocumentStore, sql: str, params=()) -> list[tuple]:
    return store.db.run_sync(lambda db: db.execute(sql, params).fetchall())


async def test_an_upload_is_chunked_embedded_and_found_by_meaning_and_by_words(store):
    water = await store.add("notes", "water.md", WATER.encode())
    await store.add("notes", "battery.md", BATTERY.encode())
    assert (water.kind, water.pages, water.chunks, water.model) == ("markdown", 1, 1, MODEL)
    vectors = rows(store, "SELECT dims, length(vector) FROM chunks")
    assert len(vectors) == 2 and all(length == 4 * dims and dims >= 256 for dims, length in vectors)
    best = (await store.search("How do I make drinking water safe?", "notes"))[0]
    assert (best.filename, best.page) == ("water.md", 1) and best.vector_rank == 1
    assert (await store.search("distilled", "notes", method="bm25"))[0].filename == "battery.md"
    assert await store.search("distilled", "another-collection") == ()


async def test_deleting_a_document_removes_its_chunks_vectors_and_index_entries(store):
    water = await store.add("notes", "water.md", WATER.encode())
    battery = await store.add("notes", "battery.md", BATTERY.encode())
    assert (await store.search("germs", "notes", method="bm25"))[0].document_id == water.id
    await store.delete(water.id)
    assert rows(store, "SELECT DISTINCT document_id FROM chunks") == [(battery.id,)]
    assert rows(store, "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH 'germs'") == []
    rows(store, "INSERT INTO chunks_fts(chunks_fts, rank) VALUES('integrity-check', 1)")  # index agrees with table
    assert [p.document_id for p in await store.search("boil water germs", "notes")] == [battery.id]
    with pytest.raises(DocumentNotFound):
        await store.delete(water.id)
    assert [d.id for d in await store.list("notes")] == [battery.id]


async def test_the_same_file_twice_and_uploads_past_the_limits_are_refused_with_reasons(embed, tmp_path):
    db = Database(tmp_path / "offgridd.db")
    store = DocumentStore(db, embed, model=MODEL, limits=Limits(max_upload_bytes=200, max_total_bytes=150))
    await store.add("a", "water.md", WATER.encode())
    with pytest.raises(DocumentExists, match="already in collection 'a'"):
        await store.add("a", "copy.md", WATER.encode())
    with pytest.raises(DocumentTooLarge, match="uploads are at most 200"):
        await store.add("a", "big.txt", b"word " * 60)
    with pytest.raises(DocumentTooLarge, match="max_total_bytes"):
        await store.add("b", "water.md", WATER.encode())  # the same file in another collection counts again
    assert len(await store.list()) == 1
    db.close()


async def test_a_document_that_would_take_the_database_past_its_bound_is_refused_before_it_is_embedded(
        embed, tmp_path):
    db = Database(tmp_path / "offgridd.db")
    embedded: list[str] = []

    async def counted(texts: list[str]) -> list[list[float]]:
        embedded.extend(texts)
        return await embed(texts)

    small = DocumentStore(db, counted, model=MODEL, limits=Limits(max_db_bytes=1 << 20))
    await small.add("notes", "water.md", WATER.encode())
    used = small.db.run_sync(used_bytes)
    # 400 pages of 120 words: about 2.4 MB of vectors and text against a 1 MiB bound
    manual = "\f".join(" ".join(f"pump{page}w{i}" for i in range(120)) for page in range(400))
    with pytest.raises(DocumentsFull, match="MiB bound .* 'manual.txt' does not fit: delete documents"):
        await small.add("notes", "manual.txt", manual.encode())
    assert embedded == [WATER.replace("\n", " ")]  # the refusal came before any of the manual was embedded
    assert [d.filename for d in await small.list()] == ["water.md"] and small.db.run_sync(used_bytes) == used
    db.close()


async def test_a_shared_document_arrives_whole_and_keeps_its_vectors_when_the_model_agrees(embed, store, tmp_path):
    water = await store.add("notes", "water.md", WATER.encode())
    data = await store.export(water.id)
    other_db = Database(tmp_path / "other.db")
    other = DocumentStore(other_db, embed, model=MODEL)
    got = await other.add_shared("kit", data, source="peer box-a")
    assert (got.collection, got.filename, got.sha256, got.pages, got.chunks) == (
        "kit", "water.md", water.sha256, water.pages, water.chunks)
    assert other_db.run_sync(lambda db: db.execute("SELECT vector FROM chunks").fetchall()) == \
        store.db.run_sync(lambda db: db.execute("SELECT vector FROM chunks").fetchall())
    assert (await other.search("boil water", "kit"))[0].filename == "water.md"
    with pytest.raises(DocumentExists):
        await other.add_shared("kit", data, source="peer box-a")
    other_db.close()


async def test_a_shared_document_from_another_embedding_model_is_embedded_again_here(embed, store, tmp_path):
    water = await store.add("notes", "water.md", WATER.encode())
    shared = msgpack.unpackb(await store.export(water.id))
    for row in shared["chunks"]:  # another model's vectors: unit length, pointing elsewhere
        row[4] = np.roll(np.frombuffer(row[4], dtype="<f4"), 7).astype("<f4").tobytes()
    shared["document"]["model"] = "bge-small-en"
    other_db = Database(tmp_path / "other.db")
    other = DocumentStore(other_db, embed, model=MODEL)
    got = await other.add_shared("kit", msgpack.packb(shared), source="peer box-a")
    assert got.model == MODEL
    assert other_db.run_sync(lambda db: db.execute("SELECT vector FROM chunks").fetchall()) == \
        store.db.run_sync(lambda db: db.execute("SELECT vector FROM chunks").fetchall())
    other_db.close()


def _mutations(good: dict) -> list[tuple[str, dict]]:
    def changed(path: tuple, value) -> dict:
        copy = msgpack.unpackb(msgpack.packb(good))
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
        return copy
    return [("format", changed(("format",), 2)), ("file name", changed(("document", "filename"), "../etc/passwd")),
            ("kind", changed(("document", "kind"), "exe")), ("sha256", changed(("document", "sha256"), "x" * 64)),
            ("model", changed(("document", "model"), "a b")), ("size", changed(("document", "size"), -1)),
            ("page", changed(("chunks", 0, 0), 99)), ("text", changed(("chunks", 0, 2), "  ")),
            ("dims", changed(("chunks", 0, 3), 3)), ("vector", changed(("chunks", 0, 4), b"\0" * 4 * 640)),
            ("row", changed(("chunks", 0), [1, 0])), ("chunks", changed(("chunks",), []))]


async def test_a_shared_document_that_is_wrong_in_any_field_is_refused_and_nothing_is_kept(store, tmp_path):
    water = await store.add("notes", "water.md", WATER.encode())
    good = msgpack.unpackb(await store.export(water.id))

    def refusal(bad: dict | bytes) -> str | None:
        try:
            read_shared(bad if isinstance(bad, bytes) else msgpack.packb(bad))
        except InvalidDocument as e:
            return str(e)
        return None

    outcomes = {what: refusal(bad) for what, bad in [*_mutations(good), ("bytes", b"\xc1 not msgpack")]}
    assert all(o and o.startswith("a shared document was refused") for o in outcomes.values()), outcomes
    assert read_shared(msgpack.packb(good)).filename == "water.md"


async def test_a_grounded_chat_gets_numbered_passages_after_its_own_system_prompt_and_the_sources(store):
    await store.add("notes", "water.md", WATER.encode())
    await store.add("notes", "battery.md", BATTERY.encode())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "Hi."},
                {"role": "assistant", "content": None}, {"role": "user", "content": "How long do I boil water?"}]
    grounded, sources = await ground(messages, "notes", store, top_k=2)
    assert grounded[1:] == messages[1:] and len(grounded) == len(messages)
    system = grounded[0]["content"]
    assert system.startswith("Be brief.\n\nAnswer using the numbered passages")
    assert "[1] water.md, page 1:\n# Boiling" in system and "[2] battery.md, page 1:" in system
    assert [(s["file"], s["page"]) for s in sources] == [("water.md", 1), ("battery.md", 1)]
    assert sources[0]["excerpt"].startswith("# Boiling") and sources[0]["score"] > sources[1]["score"]
    plain = [{"role": "user", "content": "How long do I boil water?"}]
    grounded, _ = await ground(plain, "notes", store, top_k=1)
    assert grounded[0]["role"] == "system" and grounded[1:] == plain
    assert await ground(plain, "empty", store) == (plain, [])


@pytest.mark.timeout(900)  # 32 pages and 32 questions embedded on 2 shared cores: 2-5 minutes under load
async def test_recall_at_5_on_the_field_guide_with_the_real_model(store, capsys, tmp_path):
    guide = bench.field_guide()
    started, pages = time.perf_counter(), 0
    for name, data, count in bench.uploads(guide):  # two PDFs generated here, one Markdown, one text
        document = await store.add(bench.COLLECTION, name, data)
        assert document.pages == count
        pages += count
    pages_per_second = pages / (time.perf_counter() - started)
    found = {}
    for method in ("hybrid", "vector", "bm25"):
        found[method], seconds = await bench.recall(store, guide["questions"], method=method)
    with capsys.disabled():
        print(f"\nrecall@5 on {len(guide['questions'])} questions: {json.dumps(found)}; "
              f"ingestion {pages_per_second:.2f} pages/s")
    for method, floor in RECALL_FLOOR.items():
        assert found[method] >= floor, f"{method} recall@5 {found[method]:.2f} is under {floor}"
    # the collection handed to another box as a peer hands it over is found there just as well
    shared = await bench.share(store, tmp_path / "shared.db", store.embed, MODEL, guide)
    assert shared["recall_at_5_hybrid"] == round(found["hybrid"], 3)


@pytest_asyncio.fixture(loop_scope="module")
async def client(embed, tmp_path):
    rt = build_runtime(load_settings(env={}, flags={"state": str(tmp_path), "api_key": "chat-key",
                                                    "admin_key": "admin-key"}))
    rt.store.open()
    rt.documents = DocumentStore(rt.db, embed, model=MODEL, limits=Limits(max_upload_bytes=6 << 20,
                                                                         max_total_bytes=7 << 20))
    async with TestClient(TestServer(init_app(rt))) as client:
        yield client
    rt.db.close()


ADMIN = {"Authorization": "Bearer admin-key"}
CHAT = {"Authorization": "Bearer chat-key"}


def form(name: str, data: bytes, collection: str | None = "manuals") -> aiohttp.FormData:
    body = aiohttp.FormData()
    if collection is not None:
        body.add_field("collection", collection)
    body.add_field("file", data, filename=name, content_type="application/octet-stream")
    return body


async def test_upload_list_search_and_delete_over_http_with_the_admin_key(client):
    pdf = bench.pdf_of([WATER, BATTERY])
    resp = await client.post("/api/v1/documents", data=form("../../etc/manual.pdf", pdf), headers=CHAT)
    assert resp.status == 403  # a chat key reads and searches; adding needs an admin key
    resp = await client.post("/api/v1/documents", data=form("../../etc/manual.pdf", pdf), headers=ADMIN)
    assert resp.status == 201, await resp.text()
    document = await resp.json()
    assert (document["filename"], document["kind"], document["pages"]) == ("manual.pdf", "pdf", 2)
    html = b"<html><body><p>Radios reach further from a hilltop.</p><script>fetch('/steal?x=' + TOKEN)</script>"
    assert (await client.post("/api/v1/documents", data=form("r.html", html), headers=ADMIN)).status == 201
    listed = await (await client.get("/api/v1/documents?collection=manuals", headers=CHAT)).json()
    assert [d["filename"] for d in listed["documents"]] == ["manual.pdf", "r.html"]
    assert listed["collections"][0]["name"] == "manuals" and listed["collections"][0]["documents"] == 2
    found = await (await client.get("/api/v1/documents/search", params={"q": "distilled water battery",
                                                                        "collection": "manuals"},
                                    headers=CHAT)).json()
    assert (found["passages"][0]["filename"], found["passages"][0]["page"]) == ("manual.pdf", 2)
    steal = await (await client.get("/api/v1/documents/search", params={"q": "steal fetch TOKEN",
                                                                        "collection": "manuals",
                                                                        "method": "bm25"}, headers=CHAT)).json()
    assert steal["passages"] == []  # the script's text was never indexed
    resp = await client.delete(f"/api/v1/documents/{document['id']}", headers=ADMIN)
    assert resp.status == 200 and (await resp.json())["deleted"]["id"] == document["id"]
    resp = await client.get(f"/api/v1/documents/{document['id']}", headers=CHAT)
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "document_not_found"


@pytest.mark.parametrize(("name", "data", "status", "code"), [
    ("empty.txt", b"", 400, "invalid_document"),
    ("fake.pdf", b"MZ\x90\x00not a pdf", 400, "invalid_document"),
    ("tool.exe", b"MZ\x90\x00", 415, "unsupported_document"),
    ("huge.txt", b"x" * ((6 << 20) + 1), 413, "document_too_large"),
])
async def test_hostile_uploads_over_http_are_refused_with_a_reason(client, name, data, status, code):
    resp = await client.post("/api/v1/documents", data=form(name, data), headers=ADMIN)
    body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code and body["error"]["message"], body
    assert (await (await client.get("/api/v1/documents", headers=CHAT)).json())["documents"] == []


async def test_uploads_may_be_larger_than_an_api_body_and_the_total_is_bounded(client):
    # 5 MiB: over the API's 4 MiB body limit, under documents.max_upload_bytes
    big = b"Generators must run outdoors. " + b" " * (5 << 20)
    resp = await client.post("/api/v1/documents", data=form("big.txt", big), headers=ADMIN)
    assert resp.status == 201, await resp.text()
    resp = await client.post("/api/v1/documents", data=form("big2.txt", b"Other words. " + big), headers=ADMIN)
    assert resp.status == 413 and "max_total_bytes" in (await resp.json())["error"]["message"]


async def test_a_malformed_upload_request_is_a_4xx(client):
    resp = await client.post("/api/v1/documents", json={"file": "x"}, headers=ADMIN)
    assert resp.status == 415
    body = aiohttp.FormData()
    body.add_field("collection", "manuals")
    body.add_field("other", b"x", filename="a.txt")
    assert (await client.post("/api/v1/documents", data=body, headers=ADMIN)).status == 400
    resp = await client.post("/api/v1/documents", data=form("a.txt", b"words", collection="../etc"), headers=ADMIN)
    assert resp.status == 400 and (await resp.json())["error"]["param"] == "file"
    assert (await client.get("/api/v1/documents/search?q=", headers=CHAT)).status == 400
    assert (await client.get("/api/v1/documents/search?q=x&method=magic", headers=CHAT)).status == 400
    assert (await client.delete("/api/v1/documents/abc", headers=ADMIN)).status == 404


async def test_with_documents_off_the_routes_say_so(tmp_path):
    rt = build_runtime(load_settings(env={"OFFGRID_DOCUMENTS_ENABLED": "false"}, flags={"state": str(tmp_path)}))
    assert rt.documents is None
    async with TestClient(TestServer(init_app(rt))) as client:
        resp = await client.get("/api/v1/documents/search?q=water")
        assert resp.status == 503 and (await resp.json())["error"]["code"] == "documents_disabled"
    rt.db.close()
