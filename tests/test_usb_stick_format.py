"""The stick format (usb/README.md) read back with hostile input: every wrong manifest is refused with a reason."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from gguf_factory import gguf_bytes
from usb_images import entry, put, sha256, write_manifest

from offgridd.usb.stick import (
    MAX_MANIFEST_BYTES,
    StickError,
    StickFileError,
    open_on_stick,
    parse_manifest,
    parse_sha256sum,
    read_stick,
)

SCHEMA = Path(__file__).parent.parent / "usb" / "manifest.schema.json"
MODEL = gguf_bytes()


def manifest(*models: dict, **top) -> bytes:
    return json.dumps({"format": 1, "models": list(models), **top}).encode()


def test_a_well_formed_manifest_lists_its_models():
    [m] = parse_manifest(manifest(entry("tiny", "OFFGRID/models/tiny.gguf", MODEL, description="a test model")))
    assert (m.name, m.file, m.sha256, m.size) == ("tiny", "OFFGRID/models/tiny.gguf", sha256(MODEL), len(MODEL))
    assert (m.quantization, m.license, m.description) == ("Q4_K_M", "apache-2.0", "a test model")


@pytest.mark.parametrize(("file", "why"), [
    ("../outside.gguf", "'..'"),
    ("OFFGRID/../../etc/passwd", "'..'"),
    ("/etc/passwd", "absolute path"),
    ("OFFGRID//x.gguf", "empty"),
    ("./x.gguf", "'.'"),
    ("OFFGRID\\..\\x.gguf", "backslashes"),
    ("x\0.gguf", "NUL"),
    ("", "non-empty"),
    (7, "non-empty string"),
])
def test_manifest_paths_that_could_leave_the_stick_are_refused(file, why):
    with pytest.raises(StickError, match="models\\[0\\].file") as e:
        parse_manifest(manifest({**entry("tiny", "x.gguf", MODEL), "file": file}))
    assert why in str(e.value)


@pytest.mark.parametrize(("raw", "why"), [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[]", "top level must be an object"),
    (json.dumps({"format": 2, "models": []}).encode(), "format 2 is not supported"),
    (json.dumps({"format": True, "models": []}).encode(), "is not supported"),
    (json.dumps({"format": 1, "models": []}).encode(), "1 to 256 entries"),
    (json.dumps({"format": 1, "models": [{}] * 257}).encode(), "1 to 256 entries"),
    (json.dumps({"format": 1, "models": ["x"]}).encode(), "must be an object"),
    (manifest(entry("tiny", "a.gguf", MODEL), extra=1), "unknown top-level keys"),
    (manifest(entry("tiny", "a.gguf", MODEL, run="rm -rf /")), "unknown keys ['run']"),
    (manifest(entry("../x", "a.gguf", MODEL)), "not a valid model name"),
    (manifest(entry("tiny", "a.gguf", MODEL, sha256="abc")), "sha256 must be 64 hex digits"),
    (manifest(entry("tiny", "a.gguf", MODEL, size=-1)), "size must be a positive integer"),
    (manifest(entry("tiny", "a.gguf", MODEL, size="12")), "size must be a positive integer"),
    (manifest(entry("tiny", "a.gguf", MODEL, license="")), "license: must be a non-empty string"),
    (manifest({k: v for k, v in entry("tiny", "a.gguf", MODEL).items() if k != "quantization"}), "quantization"),
    (manifest(entry("tiny", "a.gguf", MODEL), entry("tiny", "b.gguf", MODEL)),
     "duplicate model name 'tiny' (models[0] and models[1])"),
])
def test_a_wrong_manifest_is_refused_with_the_reason(raw, why):
    with pytest.raises(StickError) as e:
        parse_manifest(raw)
    assert why in str(e.value)


def test_an_oversized_manifest_is_refused_before_it_is_parsed(tmp_path):
    write_manifest(tmp_path, raw=b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(StickError, match="over the 1048576-byte limit"):
        read_stick(tmp_path)


def test_a_manifest_that_is_a_symlink_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_bytes(manifest(entry("tiny", "a.gguf", MODEL)))
    stick = tmp_path / "stick"
    (stick / "OFFGRID").mkdir(parents=True)
    (stick / "OFFGRID" / "manifest.json").symlink_to(elsewhere)
    with pytest.raises(StickError, match="symlink"):
        read_stick(stick)


def test_files_are_opened_without_following_symlinks_anywhere_on_the_path(tmp_path):
    outside = tmp_path / "outside"
    put(outside, "models/x.gguf", MODEL)
    stick = tmp_path / "stick"
    stick.mkdir()
    (stick / "models").symlink_to(outside / "models")  # a symlinked directory, not only a symlinked file
    (stick / "x.gguf").symlink_to(outside / "models" / "x.gguf")
    put(stick, "real/x.gguf", MODEL)
    for relative in ("models/x.gguf", "x.gguf"):
        with pytest.raises(StickFileError, match="symlink"):
            open_on_stick(stick, relative)
    os.close(open_on_stick(stick, "real/x.gguf"))
    with pytest.raises(StickFileError, match="not on the stick"):
        open_on_stick(stick, "real/y.gguf")
    with pytest.raises(StickFileError, match="not a regular file"):
        open_on_stick(stick, "real")
    os.mkfifo(stick / "fifo.gguf")
    with pytest.raises(StickFileError, match="not a regular file"):
        open_on_stick(stick, "fifo.gguf")  # and it did not hang waiting for a writer


def test_sha256sum_files_are_read_in_both_styles():
    digest = sha256(MODEL)
    assert parse_sha256sum(f"{digest}  tiny.gguf\n".encode(), "tiny.gguf") == digest
    assert parse_sha256sum(f"{digest.upper()} *tiny.gguf\n".encode(), "tiny.gguf") == digest
    assert parse_sha256sum(f"{digest}\n".encode(), "tiny.gguf") == digest
    with pytest.raises(StickFileError, match="no sha256sum line for 'tiny.gguf'"):
        parse_sha256sum(f"{digest}  other.gguf\n".encode(), "tiny.gguf")
    with pytest.raises(StickFileError, match="no sha256sum line"):
        parse_sha256sum(b"hello", "tiny.gguf")


def test_a_bare_gguf_needs_a_checksum_unless_unverified_imports_are_allowed(tmp_path):
    put(tmp_path, "checked.gguf", MODEL)
    put(tmp_path, "checked.gguf.sha256", f"{sha256(MODEL)}  checked.gguf\n".encode())
    put(tmp_path, "unchecked.gguf", MODEL)
    stick = read_stick(tmp_path)
    assert [(m.name, m.sha256) for m in stick.models] == [("checked", sha256(MODEL))]
    [refusal] = stick.refused
    assert refusal.file == "unchecked.gguf" and "has no checksum" in refusal.reason
    assert "usb.allow_unverified" in refusal.reason
    loose = read_stick(tmp_path, allow_unverified=True)
    assert [(m.name, m.sha256) for m in loose.models] == [("checked", sha256(MODEL)), ("unchecked", None)]


def test_the_schema_file_describes_the_same_format():
    schema = json.loads(SCHEMA.read_text())
    item = schema["properties"]["models"]["items"]
    assert schema["properties"]["format"]["const"] == 1
    assert set(item["required"]) == {"name", "file", "sha256", "size", "quantization", "license"}
    assert set(item["properties"]) == {"name", "file", "sha256", "size", "quantization", "license", "description"}
    assert item["additionalProperties"] is False and schema["additionalProperties"] is False
    assert schema["properties"]["models"]["maxItems"] == 256


def test_the_schema_file_pattern_refuses_the_paths_the_reader_refuses():
    file = json.loads(SCHEMA.read_text())["properties"]["models"]["items"]["properties"]["file"]
    pattern = re.compile(file["pattern"])
    for good in ("OFFGRID/models/a.gguf", "a.gguf", "x/.hidden.gguf", "a..b.gguf"):
        assert pattern.fullmatch(good), good
    for bad in ("/etc/passwd", "../a.gguf", "a/../b.gguf", "a/./b.gguf", "./a.gguf", "a//b.gguf", "a\\b.gguf", "a/.."):
        assert not pattern.fullmatch(bad), bad


def test_the_udev_rule_mounts_usb_filesystems_read_only_for_the_daemon():
    rule = (SCHEMA.parent / "99-offgridd-usb.rules").read_text()
    lines = " ".join(ln.rstrip("\\").strip() for ln in rule.splitlines() if ln.strip() and not ln.startswith("#"))
    assert 'ACTION=="add"' in lines and 'SUBSYSTEM=="block"' in lines and 'ENV{ID_BUS}=="usb"' in lines
    assert 'ENV{ID_FS_USAGE}=="filesystem"' in lines
    [run] = re.findall(r'RUN\{program\}\+="([^"]+)"', lines)
    argv = run.split()
    assert argv[0] == "/usr/bin/systemd-mount" and "--no-block" in argv
    assert "--options=ro,nosuid,nodev,noexec" in argv
    assert argv[-2:] == ["$devnode", "/run/offgridd/usb/%k"]  # the kernel's name, never the stick's label
