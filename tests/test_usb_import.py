"""Importing from sticks on real filesystems (an ext4 loop image, a FAT image through fusefat): good sticks import
verified, hostile or broken ones are refused with the reason and leave nothing in the store."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from gguf_factory import gguf_bytes
from usb_images import (
    big_gguf,
    entry,
    ext4_stick,
    fat_image,
    fat_stick,
    fusefat_mount,
    put,
    sha256,
    tmpfs,
    write_manifest,
)

from offgridd.db import Database
from offgridd.events import EventBus
from offgridd.jobs import JobBoard
from offgridd.store import ModelStore
from offgridd.usb import import_stick
from offgridd.usb.stick import MAX_MANIFEST_BYTES

TINY = gguf_bytes(arch="llama", tensors=2, elements=4096)
OTHER = gguf_bytes(arch="qwen2", tensors=3, elements=2048, template="{{ messages }}")
FILESYSTEMS = ["ext4", "fat"]


class Box:
    """An offgridd box's store and job board, without the daemon."""

    def __init__(self, state: Path):
        self.store = ModelStore(state / "models")
        self.db = Database(state / "offgridd.db")
        self.jobs = JobBoard(self.db, EventBus())

    def import_stick(self, root: Path, **kwargs):
        return import_stick(root, store=self.store, jobs=self.jobs, **kwargs)

    def job_rows(self) -> list[dict]:
        return self.db.run_sync(lambda db: list(db["jobs"].rows_where(order_by="started")))

    def assert_nothing_imported(self) -> None:
        assert self.store.list() == []
        assert list(self.store.blobs.iterdir()) == []
        assert list(self.store.staging.iterdir()) == [], "a partial file was left in .staging"


@pytest.fixture
def box(tmp_path):
    b = Box(tmp_path / "box")
    yield b
    b.db.close()


@pytest.fixture(params=FILESYSTEMS)
def stick(request, tmp_path):
    """Turns a directory into a mounted stick of the parametrised filesystem."""
    def mount(src: Path):
        return (ext4_stick if request.param == "ext4" else fat_stick)(src, tmp_path / "img")
    mount.fs = request.param
    return mount


def test_a_stick_with_a_manifest_imports_every_model_verified(box, stick, tmp_path):
    src = tmp_path / "src"
    put(src, "OFFGRID/models/tiny.gguf", TINY)
    put(src, "OFFGRID/models/other-model.gguf", OTHER)
    write_manifest(src, [entry("tiny", "OFFGRID/models/tiny.gguf", TINY),
                         entry("other:1b", "OFFGRID/models/other-model.gguf", OTHER, license="MIT")])
    with stick(src) as root:
        report = box.import_stick(root)
        assert (root / "OFFGRID/models/tiny.gguf").read_bytes() == TINY  # the stick is only read
    assert report.ok, report.to_dict()
    assert [(r.name, r.state) for r in report.results] == [("tiny", "done"), ("other:1b", "done")]
    assert "sha256 verified" in report.results[0].reason
    tiny, other = box.store.get("tiny"), box.store.get("other:1b")
    assert (tiny.sha256, tiny.architecture, tiny.license) == (sha256(TINY), "llama", "apache-2.0")
    assert (other.sha256, other.architecture, other.license, other.has_chat_template) == (
        sha256(OTHER), "qwen2", "MIT", True)
    assert box.store.path_of(tiny).read_bytes() == TINY
    rows = box.job_rows()
    assert [(r["kind"], r["model"], r["state"], r["bytes_done"]) for r in rows] == [
        ("usb-import", "tiny", "done", len(TINY)), ("usb-import", "other:1b", "done", len(OTHER))]


def test_plugging_the_same_stick_again_skips_what_is_already_in_the_store(box, tmp_path):
    src = tmp_path / "src"
    put(src, "OFFGRID/tiny.gguf", TINY)
    write_manifest(src, [entry("tiny", "OFFGRID/tiny.gguf", TINY)])
    with ext4_stick(src, tmp_path / "img") as root:
        assert box.import_stick(root).results[0].state == "done"
        again = box.import_stick(root)
    [result] = again.results
    assert again.ok and result.state == "skipped" and result.reason == "already in the store as 'tiny' (same sha256)"
    assert box.job_rows()[-1]["state"] == "skipped" and box.job_rows()[-1]["bytes_done"] == 0


def test_a_bare_gguf_with_its_sha256sum_beside_it_is_imported(box, stick, tmp_path):
    src = tmp_path / "src"
    put(src, "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf", OTHER)
    put(src, "Qwen2.5-0.5B-Instruct-Q4_K_M.gguf.sha256",
        f"{sha256(OTHER)}  Qwen2.5-0.5B-Instruct-Q4_K_M.gguf\n".encode())
    with stick(src) as root:
        report = box.import_stick(root)
    assert report.ok and [(r.name, r.state) for r in report.results] == [("qwen2.5-0.5b-instruct-q4_k_m", "done")]
    assert box.store.get("qwen2.5-0.5b-instruct-q4_k_m").sha256 == sha256(OTHER)


def test_a_gguf_without_checksum_is_imported_only_when_the_owner_allows_it(box, tmp_path):
    src = tmp_path / "src"
    put(src, "tiny.gguf", TINY)
    with ext4_stick(src, tmp_path / "img") as root:
        refused = box.import_stick(root)
        assert not refused.ok and "has no checksum" in refused.results[0].reason
        box.assert_nothing_imported()
        allowed = box.import_stick(root, allow_unverified=True)
    assert allowed.ok and "UNVERIFIED" in allowed.results[0].reason
    assert box.store.get("tiny").sha256 == sha256(TINY)


def _tampered(src):
    put(src, "OFFGRID/m.gguf", TINY[:-1] + b"\x01")
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", TINY)])
    return "sha256 mismatch: expected " + sha256(TINY)


def _truncated(src):
    cut = TINY[: len(TINY) // 2]  # the checksum matches the cut file: only the GGUF check can tell
    put(src, "OFFGRID/m.gguf", cut)
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", cut)])
    return "not a usable GGUF model"


def _wrong_size(src):
    put(src, "OFFGRID/m.gguf", TINY)
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", TINY, size=len(TINY) + 4096)])
    return f"size mismatch: the manifest says {len(TINY) + 4096} bytes"


def _not_gguf(src):
    data = os.urandom(64 << 10)
    put(src, "OFFGRID/m.gguf", data)
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", data)])
    return "not a GGUF file: bad magic"


def _traversal(src):
    put(src, "OFFGRID/m.gguf", TINY)
    write_manifest(src, [entry("m", "OFFGRID/../../m.gguf", TINY)])
    return "stick refused: OFFGRID/manifest.json: models[0].file: 'OFFGRID/../../m.gguf' has an empty, '.' or '..'"


def _absolute(src):
    write_manifest(src, [entry("m", "/etc/passwd", TINY)])
    return "'/etc/passwd' is an absolute path"


def _invalid_json(src):
    write_manifest(src, raw=b'{"format": 1, "models": [')
    return "stick refused: OFFGRID/manifest.json is not valid JSON"


def _oversized(src):
    write_manifest(src, raw=b"{" + b" " * MAX_MANIFEST_BYTES + b"}")
    return "over the 1048576-byte limit"


def _duplicates(src):
    put(src, "OFFGRID/a.gguf", TINY)
    put(src, "OFFGRID/b.gguf", OTHER)
    write_manifest(src, [entry("m", "OFFGRID/a.gguf", TINY), entry("m", "OFFGRID/b.gguf", OTHER)])
    return "duplicate model name 'm'"


def _missing(src):
    write_manifest(src, [entry("m", "OFFGRID/nowhere.gguf", TINY)])
    return "OFFGRID/nowhere.gguf is not on the stick"


@pytest.mark.parametrize("case", [_tampered, _truncated, _wrong_size, _not_gguf, _traversal, _absolute,
                                  _invalid_json, _oversized, _duplicates, _missing],
                         ids=lambda f: f.__name__.strip("_"))
def test_a_broken_or_hostile_stick_is_refused_with_the_reason_and_nothing_is_imported(box, stick, tmp_path, case):
    src = tmp_path / "src"
    src.mkdir()
    why = case(src)
    with stick(src) as root:
        report = box.import_stick(root)
    assert not report.ok
    reasons = [report.refused] + [r.reason for r in report.results]
    assert any(why in r for r in reasons), reasons
    box.assert_nothing_imported()
    [row] = box.job_rows()
    assert row["state"] == "failed" and why in row["reason"]  # the result and its reason are kept in sqlite


def test_a_symlink_to_a_file_outside_the_stick_is_not_followed(box, tmp_path):
    outside = put(tmp_path / "host", "secret.gguf", TINY)  # a valid model, even: the link is the problem
    src = tmp_path / "src"
    (src / "OFFGRID").mkdir(parents=True)
    (src / "OFFGRID" / "m.gguf").symlink_to(outside)
    (src / "bare.gguf").symlink_to(outside)
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", TINY)])
    with ext4_stick(src, tmp_path / "img") as root:
        assert (root / "OFFGRID" / "m.gguf").is_symlink()
        report = box.import_stick(root)
    assert [(r.file, r.state) for r in report.results] == [("bare.gguf", "failed"), ("OFFGRID/m.gguf", "failed")]
    assert all("symlink" in r.reason and "not followed" in r.reason for r in report.results)
    box.assert_nothing_imported()


class _YankedStick(JobBoard):
    """Pulls the stick (kills its filesystem) as soon as the first bytes have been copied."""

    def __init__(self, db, fusefat):
        super().__init__(db, EventBus())
        self.fusefat = fusefat

    def progress(self, job, done):
        super().progress(job, done)
        if self.fusefat.poll() is None:
            self.fusefat.send_signal(signal.SIGKILL)
            self.fusefat.wait()


def test_a_stick_removed_mid_copy_fails_the_job_cleanly_and_leaves_nothing(box, tmp_path):
    src = tmp_path / "src"
    data = big_gguf(tmp_path / "big.gguf", 48)
    put(src, "OFFGRID/big.gguf", data)
    write_manifest(src, [entry("big", "OFFGRID/big.gguf", data)])
    image = fat_image(src, tmp_path / "stick.fat")
    with fusefat_mount(image, tmp_path / "mnt") as fusefat:
        report = import_stick(tmp_path / "mnt", store=box.store, jobs=_YankedStick(box.db, fusefat))
    [result] = report.results
    assert result.state == "failed" and "read error on the stick after" in result.reason, result.reason
    assert "was the stick removed?" in result.reason and "nothing was imported" in result.reason
    box.assert_nothing_imported()
    [row] = box.job_rows()
    assert row["state"] == "failed" and 0 < row["bytes_done"] < len(data)


def test_a_full_disk_is_refused_before_anything_is_copied(tmp_path):
    src = tmp_path / "src"
    data = big_gguf(tmp_path / "big.gguf", 24)
    put(src, "OFFGRID/big.gguf", data)
    write_manifest(src, [entry("big", "OFFGRID/big.gguf", data)])
    with tmpfs(tmp_path / "small-state", "20m") as state, ext4_stick(src, tmp_path / "img") as root:
        box = Box(state)
        try:
            report = box.import_stick(root)
            [result] = report.results
            assert result.state == "failed" and result.reason.startswith("not enough space"), result.reason
            assert "nothing was copied" in result.reason
            box.assert_nothing_imported()
            assert box.job_rows()[0]["bytes_done"] == 0
        finally:
            box.db.close()


def test_a_name_taken_by_another_model_is_refused_before_copying(box, tmp_path):
    box.store.open()
    box.store.import_chunks([OTHER], name="m", source="test")
    src = tmp_path / "src"
    put(src, "OFFGRID/m.gguf", TINY)
    write_manifest(src, [entry("m", "OFFGRID/m.gguf", TINY)])
    with ext4_stick(src, tmp_path / "img") as root:
        [result] = box.import_stick(root).results
    assert result.state == "failed" and "already used by another model" in result.reason
    assert box.store.get("m").sha256 == sha256(OTHER)
