"""Board detection from fixture trees of real boards' strings, and profiles as a settings layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from boards import BOARDS, board_tree, set_temperature

from offgridd.hardware import detect, load_profiles, settings_for_board
from offgridd.hardware.probe import sample
from offgridd.hardware.profiles import ProfileError, profiles_dir

PROFILES = load_profiles(profiles_dir(None))


@pytest.mark.parametrize("board", [b for b in BOARDS if b not in ("rock-5b", "pc")])
def test_each_known_board_is_recognised_with_evidence(tmp_path, board):
    d = detect(board_tree(tmp_path, board), PROFILES)
    assert d.profile.id == board
    assert not d.profile.generic
    assert any("MemTotal" in e for e in d.evidence)


def test_an_unknown_aarch64_board_falls_back_to_the_generic_profile_and_says_why(tmp_path):
    d = detect(board_tree(tmp_path, "rock-5b"), PROFILES)
    assert d.profile.id == "generic-aarch64"
    assert "Radxa ROCK 5B" in d.reason and "generic aarch64" in d.reason


def test_a_pc_gets_the_generic_x86_64_profile(tmp_path):
    assert detect(board_tree(tmp_path, "pc"), PROFILES).profile.id == "generic-x86_64"


def test_every_profile_says_what_to_run():
    ids = {p.id for p in PROFILES}
    assert {"pi5-4gb", "pi5-8gb", "pi5-16gb", "pi4-2gb", "pi4-4gb", "pi4-8gb", "pi-zero-2w", "jetson-orin-nano-8gb",
            "jetson-nano-4gb", "generic-x86_64", "generic-aarch64"} <= ids
    for p in PROFILES:
        run = p.values["run"]
        assert {"threads", "ctx", "batch", "gpu_layers", "max_model_bytes", "quantizations", "parallel",
                "queue_depth"} <= set(run), p.id
        assert p.values["thermal"]["critical_c"] > p.values["thermal"]["throttle_c"]
        assert p.generic or {"led", "button"} <= set(p.values["gpio"])
        storage = p.values["storage"]  # what the card takes: one upload < all documents < the whole database
        assert 0 < storage["max_upload_bytes"] < storage["max_documents_bytes"] < storage["max_db_bytes"], p.id


def test_a_profile_with_an_unknown_key_is_refused(tmp_path):
    (tmp_path / "odd.toml").write_text('id = "odd"\n[run]\nturbo = true\n')
    with pytest.raises(ProfileError, match="run.turbo"):
        load_profiles(tmp_path)


def test_the_profile_is_a_layer_that_explicit_config_overrides(tmp_path):
    root = board_tree(tmp_path / "root", "pi4-2gb")
    settings, d = settings_for_board(env={}, root=root)
    assert d.profile.id == "pi4-2gb"
    assert (settings.ctx, settings.parallel, settings.hardware.throttle_c, settings.hardware.led_pin) == (
        1024, 1, 75, 17)
    assert (settings.documents.max_upload_bytes, settings.documents.max_total_bytes,
            settings.history.max_db_bytes) == (16 << 20, 256 << 20, 1 << 30)
    config = tmp_path / "config.toml"
    config.write_text("ctx = 4096\n[hardware]\nthrottle_c = 70.0\n")
    settings, _ = settings_for_board(config=config, env={}, root=root)
    assert (settings.ctx, settings.hardware.throttle_c, settings.parallel) == (4096, 70.0, 1)
    settings, _ = settings_for_board(env={"OFFGRID_CTX": "512"}, flags={"ctx": 2048}, root=root)
    assert settings.ctx == 2048


def test_forcing_a_profile_in_config(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[hardware]\nprofile = "jetson-nano-4gb"\n')
    settings, d = settings_for_board(config=config, env={}, root=board_tree(tmp_path / "root", "pc"))
    assert d.profile.id == "jetson-nano-4gb" and d.forced and settings.gpu_layers == 99


def test_profile_command_prints_the_choice_the_evidence_and_the_settings(tmp_path):
    root = board_tree(tmp_path, "pi5-8gb")
    r = subprocess.run([sys.executable, "-m", "offgridd", "profile", "--root", str(root), "--json"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["id"] == "pi5-8gb"
    assert any("Raspberry Pi 5 Model B Rev 1.0" in e for e in out["evidence"])
    assert out["settings"]["ctx"] == 4096 and out["settings"]["hardware"]["critical_c"] == 85
    text = subprocess.run([sys.executable, "-m", "offgridd", "profile", "--root", str(root)], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"}).stdout
    assert text.startswith("profile: pi5-8gb") and "ctx" in text


def test_resource_sample_reads_memory_temperature_and_pi_throttle_flags(tmp_path):
    root = board_tree(tmp_path, "pi4-2gb", available_fraction=0.5)
    set_temperature(root, 61.5, zone=1)
    flags = root / "sys/devices/platform/soc/soc:firmware/get_throttled"
    flags.parent.mkdir(parents=True)
    flags.write_text("0x50005\n")
    s = sample(root, Path(tmp_path))
    assert s.mem_total == 1891692 * 1024 and s.mem_available == 945846 * 1024
    assert s.temperature_c == 61.5 and s.load1 == 0.52
    assert s.throttled == ("under-voltage", "throttled")
    assert s.disk_free > 0
