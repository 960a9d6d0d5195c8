"""The running daemon and USB sticks: plugged in at start-up, plugged in while serving, pulled mid-copy, and a real
udev event reaching the daemon's pyudev monitor."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import EventLog, http, private_state, start_daemon, wait_for
from gguf_factory import gguf_bytes
from usb_images import big_gguf, entry, ext4_stick, fat_image, fusefat_mount, put, sha256, unmount, write_manifest

from offgridd.usb.watcher import UDEV_CONTROL, udev_running

TINY = gguf_bytes(arch="llama", tensors=2, elements=4096)


def box_state(model_state: Path, tmp_path: Path) -> Path:
    return private_state(model_state, tmp_path / "state")


def usb_daemon(model_state, tmp_path, roots: Path, **env):
    roots.mkdir(parents=True, exist_ok=True)
    return start_daemon(box_state(model_state, tmp_path), tmp_path / "daemon.log",
                        env={"OFFGRID_USB_ROOTS": str(roots), "OFFGRID_USB_POLL_SECONDS": "0.3", **env})


def jobs(daemon) -> list[dict]:
    return json.loads(http("GET", f"{daemon.url}/api/v1/jobs")[2])["jobs"]


def usb_state(daemon) -> dict:
    return json.loads(http("GET", f"{daemon.url}/api/v1/usb")[2])


def job_for(daemon, model: str, state: str | None = None) -> dict | None:
    return next((j for j in jobs(daemon) if j["model"] == model and (state is None or j["state"] == state)), None)


def assert_clean(daemon) -> None:
    assert daemon.blocked_loop_reports() == []
    assert list((daemon.state / "models" / ".staging").iterdir()) == []


def test_a_stick_plugged_in_before_start_up_is_imported(model_state, tmp_path):
    src = tmp_path / "src"
    put(src, "OFFGRID/models/tiny.gguf", TINY)
    write_manifest(src, [entry("tiny", "OFFGRID/models/tiny.gguf", TINY, license="MIT")])
    roots = tmp_path / "usb-root"
    with ext4_stick(src, roots / "sdz1") as _:  # mounted at usb-root/sdz1/ext4, as the udev rule would
        daemon = usb_daemon(model_state, tmp_path, roots)
        try:
            daemon.wait_ready()
            done = wait_for(lambda: job_for(daemon, "tiny", "done"), what="the import of tiny")
            assert done["kind"] == "usb-import" and done["bytes_done"] == len(TINY)
            assert "sha256 verified" in done["reason"]
            models = json.loads(http("GET", f"{daemon.url}/api/v1/models")[2])["models"]
            [tiny] = [m for m in models if m["name"] == "tiny"]
            assert (tiny["sha256"], tiny["license"], tiny["loaded"]) == (sha256(TINY), "MIT", "no")
            # the stick's summary is written on the loop after the import thread has ended the job
            wait_for(lambda: usb_state(daemon)["last"], what="the stick's summary")
            usb = usb_state(daemon)
            assert usb["sticks"] == [str(roots / "sdz1" / "ext4")] and usb["last"]["imported"] == ["tiny"]
            assert daemon.health()[1]["services"]["usb"]["mode"] in ("poll", "udev")
        finally:
            daemon.stop()
    assert_clean(daemon)


def test_the_daemon_keeps_serving_while_a_stick_imports_and_when_it_is_pulled_mid_copy(model_state, tmp_path):
    src = tmp_path / "src"
    data = big_gguf(tmp_path / "big.gguf", 64)
    put(src, "OFFGRID/big.gguf", data)
    write_manifest(src, [entry("big", "OFFGRID/big.gguf", data)])
    image = fat_image(src, tmp_path / "stick.fat")
    roots = tmp_path / "usb-root"
    daemon = usb_daemon(model_state, tmp_path, roots)
    try:
        daemon.wait_ready()
        events = EventLog(daemon.url)
        with fusefat_mount(image, roots / "sdy1", slow=True) as fusefat:
            running = wait_for(lambda: (j := job_for(daemon, "big", "running")) and j["bytes_done"] and j,
                               what="the import to start")
            status, _, body = http("POST", f"{daemon.url}/v1/completions",
                                   {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
            assert status == 200 and json.loads(body)["choices"][0]["text"]
            still = wait_for(lambda: (j := job_for(daemon, "big")) and j["bytes_done"] > running["bytes_done"] and j,
                             what="the import to keep going")
            assert still["state"] == "running", "the import ended before the request: use a slower stick"
            assert still["rate_bytes_per_s"] > 0
            assert still["eta_s"] is not None and still["bytes_total"] == len(data)
            fusefat.kill()  # the stick is pulled
            fusefat.wait()
            failed = wait_for(lambda: job_for(daemon, "big", "failed"), what="the import to fail")
        assert "read error on the stick" in failed["reason"] and "nothing was imported" in failed["reason"]
        assert "big" not in [m["id"] for m in json.loads(http("GET", f"{daemon.url}/v1/models")[2])["data"]]
        assert daemon.health()[0] == 200
        wait_for(lambda: [e for e in events.of("usb") if e["state"] == "idle"], what="the usb idle event")
        assert events.of("usb")[0] == {"state": "importing", "path": str(roots / "sdy1")}
        idle = [e for e in events.of("usb") if e["state"] == "idle"][0]
        assert idle["ok"] is False and idle["failed"] == 1
        progress = [e for e in events.of("job") if e["model"] == "big" and e["state"] == "running"]
        assert len(progress) >= 2 and progress[-1]["bytes_done"] > progress[0]["bytes_done"]
    finally:
        daemon.stop()
    assert_clean(daemon)


def test_usb_import_goes_through_the_running_daemon(model_state, tmp_path):
    stick = tmp_path / "stick"
    put(stick, "tiny.gguf", TINY)
    put(stick, "tiny.gguf.sha256", f"{sha256(TINY)}  tiny.gguf\n".encode())
    put(stick, "junk.gguf", b"not a model")
    put(stick, "junk.gguf.sha256", f"{sha256(b'not a model')}  junk.gguf\n".encode())
    daemon = usb_daemon(model_state, tmp_path, tmp_path / "usb-root")
    try:
        daemon.wait_ready()
        port = daemon.url.rsplit(":", 1)[1]
        env = {**os.environ, "OFFGRID_CONFIG": "/dev/null", "OFFGRID_PORT": port}
        done = subprocess.run([sys.executable, "-m", "offgridd", "usb", "import", str(stick), "--json",
                               "--state", str(tmp_path / "not-used")], capture_output=True, text=True, env=env)
        assert done.returncode == 1, done.stderr
        report = json.loads(done.stdout)
        assert [(r["name"], r["state"]) for r in report["results"]] == [("junk", "failed"), ("tiny", "done")]
        assert "not a usable GGUF model" in report["results"][0]["reason"]
        assert not (tmp_path / "not-used" / "models").exists()  # the daemon did it, in its own store
        assert job_for(daemon, "tiny", "done") and job_for(daemon, "junk", "failed")
        status, _, body = http("POST", f"{daemon.url}/api/v1/usb/import", {"path": "relative/dir"})
        assert status == 400 and json.loads(body)["error"]["param"] == "path"
    finally:
        daemon.stop()
    assert_clean(daemon)


@pytest.fixture
def udevd():
    """systemd-udevd, started here when none runs (stopped again afterwards); skipped where it cannot run."""
    if udev_running():
        yield None
        return
    binary = shutil.which("systemd-udevd") or "/lib/systemd/systemd-udevd"
    if not os.path.exists(binary) or os.geteuid() != 0:
        pytest.skip("systemd-udevd is not installed, or this test does not run as root")
    proc = subprocess.Popen([binary], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: proc.poll() is not None or udev_running(), timeout=10, what="systemd-udevd")
        if proc.poll() is not None:
            pytest.skip(f"systemd-udevd exited with {proc.returncode} on this machine")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(10)


def test_a_real_udev_event_wakes_the_daemon_and_the_stick_is_imported(model_state, tmp_path, udevd):
    src = tmp_path / "src"
    put(src, "OFFGRID/models/tiny.gguf", TINY)
    write_manifest(src, [entry("tiny", "OFFGRID/models/tiny.gguf", TINY)])
    image = tmp_path / "stick.ext4"
    made = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", str(src), str(image), "8m"], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    roots = tmp_path / "usb-root"
    daemon = usb_daemon(model_state, tmp_path, roots, OFFGRID_USB_POLL_SECONDS="3600")
    loop_dev = None
    try:
        daemon.wait_ready()
        usb = usb_state(daemon)
        assert usb["mode"] == "udev" and usb["udev_events"] == 0, (usb, UDEV_CONTROL)
        attached = subprocess.run(["losetup", "-f", "--show", str(image)], capture_output=True, text=True)
        if attached.returncode != 0:
            pytest.skip(f"this machine does not allow attaching a loop device: {attached.stderr.strip()}")
        loop_dev = attached.stdout.strip()
        where = roots / Path(loop_dev).name  # what the udev rule's systemd-mount does: /run/offgridd/usb/%k
        where.mkdir()
        mounted = subprocess.run(["mount", "-o", "ro,nosuid,nodev,noexec", loop_dev, str(where)],
                                 capture_output=True, text=True)
        assert mounted.returncode == 0, mounted.stderr
        done = wait_for(lambda: job_for(daemon, "tiny", "done"), timeout=30, what="the import after the udev event")
        assert done["source"] == f"usb:{where}/OFFGRID/models/tiny.gguf"
        usb = usb_state(daemon)
        assert usb["udev_events"] >= 1 and usb["sticks"] == [str(where)]
    finally:
        daemon.stop()
        if loop_dev:
            unmount(roots / Path(loop_dev).name)
            subprocess.run(["losetup", "-d", loop_dev], capture_output=True)
    assert_clean(daemon)
