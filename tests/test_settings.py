"""Settings come from defaults, then the config file, then OFFGRID_* environment, then flags; bad ones are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from offgridd.settings import SettingsError, load_settings


def test_each_layer_overrides_the_one_before(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('port = 8000\nthreads = 3\nmodel = "from-file"\napi_key = "s3cret"\n')
    s = load_settings(config=config, env={"OFFGRID_THREADS": "4", "OFFGRID_CTX": "4096"}, flags={"ctx": 1024})
    assert (s.port, s.threads, s.ctx, s.model, s.host) == (8000, 4, 1024, "from-file", "0.0.0.0")
    assert s.public()["api_key"] == "***"


def test_defaults_serve_the_lan_on_11611_with_the_builtin_model():
    s = load_settings(env={}, config=None)
    assert (s.host, s.port, s.model) == ("0.0.0.0", 11611, "gemma3-270m")
    assert isinstance(s.state, Path)


@pytest.mark.parametrize("text, env, message", [
    ('port = "eighty"', {}, "setting 'port' must be int"),
    ("colour = 3", {}, "unknown setting 'colour'"),
    ("port = 70000", {}, "'port' is out of range"),
    ("port = [", {}, "config file"),
    ("", {"OFFGRID_DRAIN_SECONDS": "soon"}, "environment OFFGRID_DRAIN_SECONDS"),
])
def test_a_bad_setting_is_an_error_naming_the_key(tmp_path, text, env, message):
    config = tmp_path / "config.toml"
    config.write_text(text)
    with pytest.raises(SettingsError, match=message):
        load_settings(config=config, env=env)


def test_a_missing_explicit_config_file_is_an_error(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(config=tmp_path / "nope.toml", env={})


def test_serve_with_bad_config_exits_at_once_naming_the_key(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("threads = -2\n")
    r = subprocess.run([sys.executable, "-m", "offgridd", "serve", "--config", str(config), "--state",
                        str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "'threads'" in r.stderr
