"""Writing sticks from the command line (`usb prepare` on a PC, `models export` on a box) and importing them with
`usb import`: a stick written by one box imports on another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import free_port
from gguf_factory import gguf_bytes
from usb_images import ext4_stick, fat_image, fusefat_mount, put, sha256, tmpfs, write_manifest

from offgridd.store import ModelStore

TINY = gguf_bytes(arch="llama", tensors=2, elements=4096)
OTHER = gguf_bytes(arch="qwen2", tensors=2, elements=8192)


def offgridd(*args: str, state: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OFFGRID_CONFIG": "/dev/null", "OFFGRID_PORT": str(free_port())}  # no daemon answers
    if state is not None:
        args = (*args, "--state", str(state))
    return subprocess.run([sys.executable, "-m", "offgridd", *args], capture_output=True, text=True, env=env,
                          timeout=120)


def test_a_stick_prepared_on_a_pc_imports_on_a_box(tmp_path):
    pc = tmp_path / "pc"
    put(pc, "Llama-Tiny-Q4_K_M.gguf", TINY)
    put(pc, "other.gguf", OTHER)
    with ext4_stick(tmp_path / "empty", tmp_path / "img", writable=True, size_kib=16384) as mnt:
        wrote = offgridd("usb", "prepare", str(mnt), str(pc / "Llama-Tiny-Q4_K_M.gguf"), str(pc / "other.gguf"),
                         "--license", "MIT")
        assert wrote.returncode == 0, wrote.stderr
        assert f"sha256 {sha256(TINY)}" in wrote.stdout
        doc = json.loads((mnt / "OFFGRID" / "manifest.json").read_text())
        assert doc["format"] == 1
        assert [(m["name"], m["file"], m["sha256"], m["size"], m["quantization"], m["license"])
                for m in doc["models"]] == [
            ("llama-tiny-q4_k_m", "OFFGRID/models/llama-tiny-q4_k_m.gguf", sha256(TINY), len(TINY), "Q4_K_M", "MIT"),
            ("other", "OFFGRID/models/other.gguf", sha256(OTHER), len(OTHER), "Q4_K_M", "MIT")]
        assert not list(mnt.rglob("*.partial"))
        state = tmp_path / "box"
        imported = offgridd("usb", "import", str(mnt), "--json", state=state)
    assert imported.returncode == 0, imported.stderr
    report = json.loads(imported.stdout)
    assert report["ok"] and [r["state"] for r in report["results"]] == ["done", "done"]
    store = ModelStore(state / "models")
    assert {m.name: m.sha256 for m in store.list()} == {"llama-tiny-q4_k_m": sha256(TINY), "other": sha256(OTHER)}


def test_a_stick_prepared_with_documents_carries_them_in_their_collection_folder(tmp_path):
    pc = tmp_path / "pc"
    put(pc, "tiny.gguf", TINY)
    put(pc, "pump manual.md", b"# Pump\nPrime the pump before starting it.")
    put(pc, "notes.docx", b"PK\x03\x04")
    nothing = offgridd("usb", "prepare", str(tmp_path))
    assert nothing.returncode == 2 and "--documents" in nothing.stderr
    with ext4_stick(tmp_path / "empty", tmp_path / "img", writable=True, size_kib=16384) as mnt:
        refused = offgridd("usb", "prepare", str(mnt), "--documents", str(pc / "notes.docx"))
        assert refused.returncode == 1 and "not '.docx' files" in refused.stderr and not (mnt / "documents").exists()
        wrote = offgridd("usb", "prepare", str(mnt), str(pc / "tiny.gguf"), "--documents", str(pc / "pump manual.md"),
                         "--collection", "manuals")
        assert wrote.returncode == 0, wrote.stderr
        assert "wrote documents/manuals/pump manual.md" in wrote.stdout and wrote.stdout.count("is ready") == 1
        assert (mnt / "documents" / "manuals" / "pump manual.md").read_bytes().startswith(b"# Pump")
        assert json.loads((mnt / "OFFGRID" / "manifest.json").read_text())["models"][0]["name"] == "tiny"


def test_a_model_exported_from_one_box_imports_on_another_through_a_fat_stick(tmp_path):
    first = tmp_path / "first"
    store = ModelStore(first / "models")
    store.open()
    store.import_chunks([OTHER], name="qwen:0.5b", source="test", license="apache-2.0")
    out = tmp_path / "stick-tree"
    out.mkdir()
    exported = offgridd("models", "export", "qwen:0.5b", "--to", str(out), state=first)
    assert exported.returncode == 0, exported.stderr
    assert (out / "OFFGRID/models/qwen-0.5b.gguf").read_bytes() == OTHER  # FAT has no ':' in names
    with fusefat_mount(fat_image(out, tmp_path / "stick.fat"), tmp_path / "mnt") as _:
        second = tmp_path / "second"
        imported = offgridd("usb", "import", str(tmp_path / "mnt"), state=second)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.startswith("imported qwen:0.5b: qwen2 Q4_K_M")
    m = ModelStore(second / "models").get("qwen:0.5b")
    assert (m.sha256, m.license) == (sha256(OTHER), "apache-2.0")


def test_export_adds_to_a_stick_that_already_has_models(tmp_path):
    state = tmp_path / "box"
    store = ModelStore(state / "models")
    store.open()
    store.import_chunks([OTHER], name="other", source="test")
    stick = tmp_path / "stick"
    put(stick, "OFFGRID/models/tiny.gguf", TINY)
    write_manifest(stick, [{"name": "tiny", "file": "OFFGRID/models/tiny.gguf", "sha256": sha256(TINY),
                            "size": len(TINY), "quantization": "Q4_K_M", "license": "MIT"}])
    assert offgridd("models", "export", "other", "--to", str(stick), state=state).returncode == 0
    names = [m["name"] for m in json.loads((stick / "OFFGRID/manifest.json").read_text())["models"]]
    assert names == ["tiny", "other"]


def test_writing_a_stick_without_space_is_refused_before_writing(tmp_path):
    pc = tmp_path / "pc"
    put(pc, "tiny.gguf", TINY)
    state = tmp_path / "box"
    store = ModelStore(state / "models")
    store.open()
    store.import_chunks([OTHER], name="other", source="test")
    with tmpfs(tmp_path / "small", "64k") as small:
        prepared = offgridd("usb", "prepare", str(small), str(pc / "tiny.gguf"))
        exported = offgridd("models", "export", "other", "--to", str(small), state=state)
        assert list(small.iterdir()) == []
    for done in (prepared, exported):
        assert done.returncode == 1
        assert "not enough space on" in done.stderr and "nothing was written" in done.stderr


def test_prepare_refuses_a_file_that_is_not_a_gguf_model(tmp_path):
    put(tmp_path, "notes.gguf", b"these are my notes, not a model")
    done = offgridd("usb", "prepare", str(tmp_path / "stick"), str(tmp_path / "notes.gguf"))
    assert done.returncode == 1 and "is not a directory" in done.stderr
    (tmp_path / "stick").mkdir()
    done = offgridd("usb", "prepare", str(tmp_path / "stick"), str(tmp_path / "notes.gguf"))
    assert done.returncode == 1 and "is not a usable GGUF model: not a GGUF file" in done.stderr
    assert list((tmp_path / "stick").iterdir()) == []


def test_usb_import_exits_non_zero_and_says_why_when_something_is_refused(tmp_path):
    stick = tmp_path / "stick"
    put(stick, "good.gguf", TINY)
    put(stick, "good.gguf.sha256", f"{sha256(TINY)}  good.gguf\n".encode())
    put(stick, "tampered.gguf", OTHER[:-1] + b"\x07")
    put(stick, "tampered.gguf.sha256", f"{sha256(OTHER)}  tampered.gguf\n".encode())
    done = offgridd("usb", "import", str(stick), state=tmp_path / "box")
    assert done.returncode == 1
    assert "imported good:" in done.stdout
    assert f"REFUSED tampered: sha256 mismatch: expected {sha256(OTHER)}" in done.stderr
    assert "the file is left on the stick" in done.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    done = offgridd("usb", "import", str(empty), state=tmp_path / "box")
    assert done.returncode == 1 and "no models on" in done.stderr
