"""One typed settings object, layered: defaults ← config file ← OFFGRID_* environment ← command-line flags."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/offgridd/config.toml")
ENV_PREFIX = "OFFGRID_"


class SettingsError(ValueError):
    """A setting is wrong; the message names the key and where it came from."""


def default_state_dir() -> Path:
    if os.environ.get("STATE_DIRECTORY"):  # set by systemd's StateDirectory=
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    if os.geteuid() == 0:
        return Path("/var/lib/offgridd")
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local/share") / "offgridd"


@dataclass(slots=True, kw_only=True)
class Settings:
    host: str = "0.0.0.0"
    port: int = 11611
    state: Path = dataclasses.field(default_factory=default_state_dir)
    model: str = "gemma3-270m"
    threads: int = 0  # 0: one per physical core
    ctx: int = 2048
    batch: int = 512
    max_loaded_models: int = 1
    api_key: str | None = None  # when set, /v1/* needs "Authorization: Bearer <key>"
    max_body_bytes: int = 4 << 20
    drain_seconds: float = 10.0
    worker_start_timeout: float = 300.0
    log_level: str = "info"

    def validate(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "threads": 0 <= self.threads <= 256,
            "ctx": 128 <= self.ctx <= 1 << 20,
            "batch": 1 <= self.batch <= 1 << 16,
            "max_loaded_models": 1 <= self.max_loaded_models <= 64,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "drain_seconds": self.drain_seconds >= 0,
            "worker_start_timeout": self.worker_start_timeout > 0,
            "log_level": self.log_level.lower() in ("debug", "info", "warning", "error"),
        }
        for key, ok in checks.items():
            if not ok:
                raise SettingsError(f"setting {key!r} is out of range: {getattr(self, key)!r}")

    def public(self) -> dict:
        """Settings as plain data, with the secret masked."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["state"] = str(self.state)
        if self.api_key:
            out["api_key"] = "***"
        return out


def _coerce(key: str, value: object, hint: object, origin: str) -> object:
    """Turn a raw value into the field's type, or raise naming the key."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None or (isinstance(value, str) and value == "" and type(None) in allowed):
        if type(None) in allowed:
            return None
    for t in allowed:
        if t is type(None):
            continue
        if t is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                return value.lower() in ("1", "true", "yes", "on")
        elif t is int and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, str):
                try:
                    return int(value, 0)
                except ValueError:
                    pass
        elif t is float and not isinstance(value, bool):
            if isinstance(value, int | float):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif t in (str, Path) and isinstance(value, str):
            return t(value)
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise SettingsError(f"{origin}: setting {key!r} must be {names}, got {value!r}")


def load_settings(config: Path | None = None, env: dict[str, str] | None = None, flags: dict | None = None) -> Settings:
    """Build the settings from every layer; a bad value is an error that names its key and layer."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(Settings)
    values: dict[str, object] = {}

    path = config or (Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else DEFAULT_CONFIG)
    if config is not None or path != DEFAULT_CONFIG or path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"config file {path}: {e}") from None
        for key, value in data.items():
            if key not in hints:
                raise SettingsError(f"config file {path}: unknown setting {key!r}")
            values[key] = _coerce(key, value, hints[key], f"config file {path}")

    for key, hint in hints.items():
        name = ENV_PREFIX + key.upper()
        if name in env:
            values[key] = _coerce(key, env[name], hint, f"environment {name}")

    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, hints[key], f"flag --{key}") if isinstance(value, str) else value

    settings = Settings(**values)
    settings.validate()
    return settings
