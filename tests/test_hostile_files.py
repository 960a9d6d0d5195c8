"""Hostile files on a stick or from a peer cost one job with a reason, never a dead task or a stick left half-read."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import struct
import tracemalloc
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from gguf_factory import _string, gguf_bytes
from usb_images import entry, ext4_stick, put, write_manifest

from offgridd.db import Database
from offgridd.events import EventBus
from offgridd.jobs import JobBoard
from offgridd.metrics import Metrics
from offgridd.peers.exchange import BLOB_PATH
from offgridd.peers.peer import Peer
from offgridd.peers.sync import ModelPuller
from offgridd.settings import Settings
from offgridd.store import GgufError, ModelStore, read_gguf_info
from offgridd.usb import import_stick

ARRAY, STRING, UINT32 = 9, 8, 4


def header(*kvs: bytes, tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensors, len(kvs)) + b"".join(kvs)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return _string(key) + struct.pack("<I", vtype) + payload


def usable(*extra: bytes, alignment: bytes | None = None, elements: int = 64) -> bytes:
    """A valid file (two F32 tensors) whose metadata also holds `extra`, ahead of the keys the validator needs."""
    given = {e[8:8 + struct.unpack_from("<Q", e)[0]] for e in extra}
    base = {b"general.architecture": kv("general.architecture", STRING, _string("llama")),
            b"llama.context_length": kv("llama.context_length", UINT32, struct.pack("<I", 4096)),
            b"general.file_type": kv("general.file_type", UINT32, struct.pack("<I", 15))}
    kvs = [*extra, *(v for k, v in base.items() if k not in given)]
    if alignment is not None:
        kvs.append(alignment)
    out = header(*kvs, tensors=2)
    for i in range(2):
        out += _string(f"t{i}") + struct.pack("<IQIQ", 1, elements, 0, i * elements * 4)
    out += b"\0" * (-len(out) % 32)
    return out + b"\0" * (8 * elements)


def nested_arrays(depth: int) -> bytes:
    """An array of an array of ... of one uint32, `depth` arrays deep."""
    return struct.pack("<IQ", ARRAY, 1) * (depth - 1) + struct.pack("<IQ", UINT32, 1) + struct.pack("<I", 7)


def read(tmp_path: Path, data: bytes):
    path = tmp_path / "hostile.gguf"
    path.write_bytes(data)
    return read_gguf_info(path)


@pytest.mark.parametrize("kvs, reason", [
    ([kv("general.alignment", STRING, _string("32"))], "general.alignment .*uint32"),
    ([kv("general.alignment", STRING, _string("thirty-two"))], "general.alignment .*uint32"),
    ([kv("general.alignment", UINT32, struct.pack("<I", 0))], "general.alignment 0 is not a power of two"),
    ([kv("general.architecture", UINT32, struct.pack("<I", 5))], "general.architecture .*string"),
    ([kv("general.file_type", STRING, _string("Q4_K_M"))], "general.file_type .*integer"),
    ([kv("llama.context_length", STRING, _string("4096"))], "llama.context_length .*integer"),
    ([kv("tokenizer.chat_template", UINT32, struct.pack("<I", 1))], "tokenizer.chat_template .*string"),
    ([kv("deep", ARRAY, nested_arrays(2))], "arrays of arrays"),
    ([kv("deep", ARRAY, nested_arrays(5000))], "arrays of arrays"),
    ([kv("", UINT32, struct.pack("<I", 1))], "empty metadata key"),
    ([kv("k" * 300, UINT32, struct.pack("<I", 1))], "key of 300 bytes"),
    ([kv("dup", UINT32, struct.pack("<I", 1)), kv("dup", UINT32, struct.pack("<I", 2))], "duplicate metadata key"),
])
def test_mistyped_nested_or_odd_metadata_is_refused_with_a_gguf_error_naming_it(tmp_path, kvs, reason):
    with pytest.raises(GgufError, match=reason):
        read(tmp_path, usable(*kvs))


def test_recursion_deeper_than_python_allows_is_a_gguf_error_not_a_recursion_error(tmp_path):
    with pytest.raises(GgufError):
        read(tmp_path, header(kv("deep", ARRAY, nested_arrays(100_000))))


def test_a_long_tensor_name_is_refused_as_llama_cpp_would(tmp_path):
    data = header(kv("general.architecture", STRING, _string("llama")), tensors=1)
    data += _string("t" * 64) + struct.pack("<IQIQ", 1, 4, 0, 0)
    data += bytes(-len(data) % 32 + 16)
    with pytest.raises(GgufError, match="tensor name of 64 bytes"):
        read(tmp_path, data)


def test_a_valid_file_with_long_strings_and_a_uint32_alignment_still_reads(tmp_path):
    info = read(tmp_path, usable(kv("tokenizer.chat_template", STRING, _string("{{ m }}" * 20_000)),
                                 kv("general.description", STRING, _string("é" * 50_000)),
                                 alignment=kv("general.alignment", UINT32, struct.pack("<I", 32))))
    assert info.architecture == "llama" and info.has_chat_template and info.context_length == 4096


def sparse_gguf(path: Path, strings: list[int]) -> Path:
    """A GGUF whose metadata holds string values of these lengths, written sparse so the disk holds none of them."""
    with open(path, "wb") as f:
        f.write(header(kv("general.architecture", STRING, _string("llama")),
                       kv("llama.context_length", UINT32, struct.pack("<I", 4096)))[:16])
        f.write(struct.pack("<Q", 2 + len(strings)))
        f.write(kv("general.architecture", STRING, _string("llama")))
        f.write(kv("llama.context_length", UINT32, struct.pack("<I", 4096)))
        for i, n in enumerate(strings):
            f.write(kv(f"junk.{i}", STRING, struct.pack("<Q", n)))
            f.seek(n, 1)
        f.truncate()
    return path


@pytest.mark.parametrize("strings, refused", [([200 << 20], True), ([15 << 20] * 14, False)])
def test_huge_string_values_are_skipped_or_refused_without_being_read_into_memory(tmp_path, strings, refused):
    path = sparse_gguf(tmp_path / "huge.gguf", strings)
    assert path.stat().st_size > 200 << 20
    tracemalloc.start()
    try:
        with pytest.raises(GgufError, match="out of bounds" if refused else "no tensors"):
            read_gguf_info(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"validating held {peak} bytes"


# --- a stick: one bad file costs one failed job, and the rest of the stick is still imported ---

HOSTILE = usable(kv("general.alignment", STRING, _string("thirty-two")))


class Box:
    """An offgridd box's store and job board, without the daemon."""

    def __init__(self, state: Path):
        self.store = ModelStore(state / "models")
        self.db = Database(state / "offgridd.db")
        self.jobs = JobBoard(self.db, EventBus())

    def jobs_by_model(self) -> dict[str, dict]:
        return {r["model"]: r for r in self.db.run_sync(lambda db: list(db["jobs"].rows_where()))}


@pytest.fixture
def box(tmp_path):
    b = Box(tmp_path / "box")
    yield b
    b.db.close()


def three_model_stick(src: Path, bad: bytes) -> Path:
    put(src, "OFFGRID/first.gguf", GOOD)
    put(src, "OFFGRID/bad.gguf", bad)
    put(src, "OFFGRID/last.gguf", LAST)
    write_manifest(src, [entry("first", "OFFGRID/first.gguf", GOOD), entry("bad", "OFFGRID/bad.gguf", bad),
                         entry("last", "OFFGRID/last.gguf", LAST)])
    return src


GOOD = gguf_bytes(arch="llama", tensors=2, elements=512)
LAST = gguf_bytes(arch="qwen2", tensors=2, elements=256)


def test_a_stick_with_a_mistyped_gguf_header_fails_that_job_with_the_reason_and_imports_the_rest(box, tmp_path):
    with ext4_stick(three_model_stick(tmp_path / "src", HOSTILE), tmp_path / "img") as root:
        report = import_stick(root, store=box.store, jobs=box.jobs)
    assert [(r.name, r.state) for r in report.results] == [("first", "done"), ("bad", "failed"), ("last", "done")]
    assert "general.alignment is a string; it must be uint32" in report.results[1].reason
    jobs = box.jobs_by_model()
    assert jobs["bad"]["state"] == "failed" and "general.alignment" in jobs["bad"]["reason"]
    assert box.jobs.running() == []
    assert sorted(m.name for m in box.store.list()) == ["first", "last"]
    assert list(box.store.staging.iterdir()) == []


def test_any_unexpected_error_importing_one_model_fails_its_job_and_the_stick_goes_on(box, tmp_path, monkeypatch):
    from offgridd.store import store as store_module

    real = store_module.read_gguf_info

    def validator_with_a_bug(path):
        if path.stat().st_size == len(HOSTILE):
            raise RecursionError("maximum recursion depth exceeded")  # as the validator once did
        return real(path)

    monkeypatch.setattr(store_module, "read_gguf_info", validator_with_a_bug)
    with ext4_stick(three_model_stick(tmp_path / "src", HOSTILE), tmp_path / "img") as root:
        report = import_stick(root, store=box.store, jobs=box.jobs)
    assert [(r.name, r.state) for r in report.results] == [("first", "done"), ("bad", "failed"), ("last", "done")]
    reason = report.results[1].reason
    assert "RecursionError" in reason and "nothing was imported" in reason
    jobs = box.jobs_by_model()
    assert jobs["bad"]["state"] == "failed" and jobs["bad"]["reason"] == reason
    assert box.jobs.running() == []
    assert sorted(m.name for m in box.store.list()) == ["first", "last"]
    assert list(box.store.staging.iterdir()) == [], "a partial file was left in .staging"


# --- a peer: a hostile blob costs one failed pull, and the sync task goes on to the next model ---

def hostile_peer(port: int, blobs: dict[str, bytes]) -> Peer:
    models = {name: {"name": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
              for name, data in blobs.items()}
    return Peer(node="ab" * 16, name="hostile", address="127.0.0.1", http_port=port, version="test",
                inventory="0" * 16, models_count=len(models), load=0, queue=0, every=2.0, boot=1, seq=1,
                models=models)


@pytest.mark.parametrize("how", ["mistyped header", "validator bug"])
async def test_a_peer_serving_a_hostile_blob_fails_that_pull_and_the_sync_task_pulls_the_next_model(
        tmp_path, monkeypatch, how):
    blobs = {"a-hostile": HOSTILE, "b-good": GOOD}
    by_sha = {hashlib.sha256(d).hexdigest(): d for d in blobs.values()}

    async def blob(request):
        return web.Response(body=by_sha[request.match_info["sha"]])

    app = web.Application()
    app.router.add_get(BLOB_PATH + "{sha}", blob)
    if how == "validator bug":
        from offgridd.store import store as store_module

        real = store_module.read_gguf_info
        monkeypatch.setattr(store_module, "read_gguf_info", lambda p: (
            (_ for _ in ()).throw(RecursionError("maximum recursion depth exceeded"))
            if p.stat().st_size == len(HOSTILE) else real(p)))
    box = Box(tmp_path / "box")
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        peer = hostile_peer(server.port, blobs)

        @contextlib.asynccontextmanager
        async def call(peer, path, headers=None, limits=None):
            async with session.get(peer.url + path, headers=headers, timeout=limits) as resp:
                yield resp

        puller = ModelPuller(box.store, box.jobs, EventBus(), Metrics(), Settings(), peers=lambda: [peer],
                             changed=lambda: None, call=call)
        task = asyncio.create_task(puller.run())
        try:
            async with asyncio.timeout(30):
                while "b-good" not in {m.name for m in box.store.list()} or puller.current is not None:
                    assert not task.done(), f"the sync task died: {task.exception()!r}"
                    await asyncio.sleep(0.05)
            assert not task.done()
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    jobs = box.jobs_by_model()
    assert jobs["a-hostile"]["state"] == "failed" and jobs["b-good"]["state"] == "done"
    assert ("RecursionError" if how == "validator bug" else "general.alignment") in jobs["a-hostile"]["reason"]
    assert [m.name for m in box.store.list()] == ["b-good"]
    assert list(puller.partials.iterdir()) == [] and list(box.store.staging.iterdir()) == []
    box.db.close()


def test_a_stick_file_named_in_bytes_that_are_not_utf8_is_refused_and_its_job_is_recorded(box, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    bad = os.path.join(os.fsencode(src), b"caf\xe9.gguf")  # Latin-1, as an old PC might write it
    Path(os.fsdecode(bad)).write_bytes(GOOD)
    Path(os.fsdecode(bad + b".sha256")).write_text(hashlib.sha256(GOOD).hexdigest())
    put(src, "last.gguf", LAST)
    put(src, "last.gguf.sha256", hashlib.sha256(LAST).hexdigest().encode())
    with ext4_stick(src, tmp_path / "img") as root:
        report = import_stick(root, store=box.store, jobs=box.jobs)
    states = {r.file: (r.state, r.reason) for r in report.results}
    assert states["caf\ufffd.gguf"][0] == "failed" and "not UTF-8" in states["caf\ufffd.gguf"][1]
    assert states["last.gguf"][0] == "done"
    rows = box.db.run_sync(lambda db: [(r["source"], r["state"]) for r in db["jobs"].rows_where()])
    assert any(source.endswith("caf\ufffd.gguf") and state == "failed" for source, state in rows), rows
    assert [m.name for m in box.store.list()] == ["last"]
