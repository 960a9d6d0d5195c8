"""Stick images for the USB tests: an ext4 loop image mounted by the test, a FAT image written with mtools and mounted
with fusefat, and the stick layout written by hand (not by offgridd's writer, so the format itself is under test)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gguf_factory import gguf_bytes

from offgridd.usb.mounts import mounted_sticks


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def big_gguf(path: Path, mib: int) -> bytes:
    """A valid GGUF of about `mib` MiB, written fast (the tensor data is a repeated pattern)."""
    elements = (mib << 20) // 8
    small = gguf_bytes(tensors=2, elements=8)
    header = bytearray(small[: len(small) - 2 * 8 * 4])
    # patch the two tensors' element counts and offsets (see gguf_factory: name, n_dims, dim, type, offset)
    for i in range(2):
        name = f"t{i}".encode()
        at = header.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + 4
        header[at:at + 8] = struct.pack("<Q", elements)
        header[at + 12:at + 20] = struct.pack("<Q", i * elements * 4)
    data = bytes(header) + (struct.pack("<8f", *range(8)) * (elements // 8)) * 2
    path.write_bytes(data)
    return data


def entry(name: str, file: str, data: bytes, **override) -> dict:
    return {"name": name, "file": file, "sha256": sha256(data), "size": len(data), "quantization": "Q4_K_M",
            "license": "apache-2.0", **override}


def write_manifest(src: Path, models: list[dict] | None = None, *, raw: bytes | None = None) -> Path:
    path = src / "OFFGRID" / "manifest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw if raw is not None else json.dumps({"format": 1, "models": models}).encode())
    return path


def put(src: Path, file: str, data: bytes) -> Path:
    path = src / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True)


def _size_kib(src: Path) -> int:
    total = sum(p.lstat().st_size for p in src.rglob("*"))
    return max(8192, int(total * 1.3) // 1024 + 4096)


def _wait_mounted(path: Path, proc: subprocess.Popen | None = None, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(m.path == path for m in mounted_sticks([str(path.parent)])):
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.05)
    pytest.skip(f"mounting {path} did not happen (fusefat exited with {proc and proc.returncode})")


def unmount(path: Path) -> None:
    for args in (("umount", str(path)), ("umount", "-l", str(path))):
        if _run(*args).returncode == 0:
            return


@contextlib.contextmanager
def ext4_stick(src: Path, work: Path, *, writable: bool = False, size_kib: int | None = None) -> Iterator[Path]:
    """`src` copied into a fresh ext4 image (mkfs.ext4 -d), loop-mounted read-only, nosuid, nodev, noexec."""
    if not shutil.which("mkfs.ext4"):
        pytest.skip("mkfs.ext4 is not installed (e2fsprogs)")
    work.mkdir(parents=True, exist_ok=True)
    src.mkdir(parents=True, exist_ok=True)
    image, mnt = work / "stick.ext4", work / "ext4"
    made = _run("mkfs.ext4", "-q", "-F", "-E", "root_owner=0:0", "-d", str(src), str(image),
                f"{size_kib or _size_kib(src)}k")
    assert made.returncode == 0, made.stderr
    mnt.mkdir(exist_ok=True)
    opts = ("rw" if writable else "ro") + ",nosuid,nodev,noexec"
    mounted = _run("mount", "-o", f"loop,{opts}", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a loop image: {mounted.stderr.strip()}")
    try:
        yield mnt
    finally:
        unmount(mnt)


@contextlib.contextmanager
def fusefat_mount(image: Path, mnt: Path, *, slow: bool = False) -> Iterator[subprocess.Popen]:
    """Mount a FAT image read-only with fusefat (this kernel has no vfat driver); yields the fusefat process.

    `slow`: 4 KiB reads, about 5 MB/s here, like a cheap USB 2 stick, so an import lasts long enough to watch.
    """
    if not shutil.which("fusefat") or not os.path.exists("/dev/fuse"):
        pytest.skip("fusefat or /dev/fuse is missing")
    mnt.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["fusefat", "-f", "-o", "ro,max_read=4096" if slow else "ro", str(image), str(mnt)],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_mounted(mnt, proc)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if any(m.path == mnt for m in mounted_sticks([str(mnt.parent)])):
            unmount(mnt)


def fat_image(src: Path, image: Path) -> Path:
    """A FAT32 image holding `src`'s tree, written with mtools (no mount needed)."""
    if not shutil.which("mformat"):
        pytest.skip("mtools is not installed")
    sectors = max(_size_kib(src) * 2, 140_000)  # FAT32 wants at least ~65k clusters
    with open(image, "wb") as f:
        f.truncate(sectors * 512)
    made = _run("mformat", "-i", str(image), "-F", "-T", str(sectors), "::")
    assert made.returncode == 0, made.stderr
    for child in sorted(src.iterdir()):
        copied = _run("mcopy", "-i", str(image), "-s", "-Q", str(child), "::")
        assert copied.returncode == 0, copied.stderr
    return image


@contextlib.contextmanager
def fat_stick(src: Path, work: Path) -> Iterator[Path]:
    work.mkdir(parents=True, exist_ok=True)
    image = fat_image(src, work / "stick.fat")
    with fusefat_mount(image, work / "fat"):
        yield work / "fat"


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    mounted = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "offgrid-test", str(path))
    if mounted.returncode != 0:
        pytest.skip(f"this machine does not allow mounting a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        unmount(path)
