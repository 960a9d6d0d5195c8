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
class UsbSettings:
    enabled: bool = True
    roots: list[str] = dataclasses.field(default_factory=lambda: ["/run/offgridd/usb", "/media", "/run/media"])
    allow_unverified: bool = False  # import a GGUF that comes with no checksum
    load_after_import: bool = False
    poll_seconds: float = 5.0  # rescan period where udev is not available


@dataclass(slots=True, kw_only=True)
class PeerSettings:
    enabled: bool = True
    group: str = "239.255.116.116"
    port: int = 11612
    static: list[str] = dataclasses.field(default_factory=list)  # "host:port" for networks without multicast
    sync: str = "pull"  # "off" | "pull"
    sync_documents: bool = False  # also pull every peer's collections as they change (else only when asked)
    interval: float = 5.0
    bandwidth_limit: int = 0  # bytes per second for model pulls, 0 for no cap
    interface: str = ""  # IPv4 address of the interface to announce on; empty: the one the routing table picks


@dataclass(slots=True, kw_only=True)
class HardwareSettings:
    root: Path = Path("/")  # where /proc, /sys and /etc are read from (tests pass fixture trees)
    profile: str | None = None  # force a profile id instead of detecting one
    profiles_dir: Path | None = None  # default: the hw-profiles/ shipped with offgridd
    sample_seconds: float = 3.0
    throttle_c: float = 80.0  # fewer threads and sequences from here
    critical_c: float = 90.0  # no new work from here until it cools
    cool_margin_c: float = 5.0  # hysteresis: a step is undone only this far below its threshold
    low_memory: float = 0.10  # available/total below this: shed load
    memory_ok: float = 0.20  # ... and back above this to recover
    led_pin: int | None = None
    button_pin: int | None = None
    button_action: str = "shutdown"  # "shutdown" | "none"
    button_hold_seconds: float = 3.0


@dataclass(slots=True, kw_only=True)
class DocumentSettings:
    enabled: bool = True  # /api/v1/documents: uploads searched by meaning and words, and chats grounded in them
    max_upload_bytes: int = 32 << 20  # one upload; larger ones are refused (413)
    max_total_bytes: int = 512 << 20  # all uploads together; 0: no bound
    chunk_words: int = 120  # words per chunk (about 160 tokens), each chunk within one page
    overlap_words: int = 30  # words a chunk shares with the one before
    top_k: int = 5  # passages a grounded chat gets, and a search returns unless asked
    embedding_model: str = ""  # the model whose embeddings index documents; empty: the default model


@dataclass(slots=True, kw_only=True)
class VoiceSettings:
    enabled: bool = True  # /v1/audio/*: speech to text and text to speech
    stt_model: str = "whisper-tiny.en"  # what whisper-1 (and no model) means
    tts_model: str = "piper-joe-medium"  # what tts-1 and tts-1-hd (and no model) mean
    beside_decoding: bool = True  # speech may run while a chat decodes; small boards' profiles say false
    preload: bool = False  # register and load the default speech models at start, not at their first use
    threads: int = 0  # threads per speech request; 0: one per physical core
    max_upload_bytes: int = 25 << 20  # OpenAI's limit for a transcription upload
    max_audio_seconds: float = 600.0  # longer recordings are refused, not queued for minutes
    max_input_chars: int = 4096  # OpenAI's limit for text to speak
    button_pin: int | None = None  # push to talk (no screen): hold to record, release to hear the answer spoken
    capture_command: str = "arecord -q -t wav -f S16_LE -r 16000 -c 1"  # add -D plughw:CARD=... for a USB device
    playback_command: str = "aplay -q"


@dataclass(slots=True, kw_only=True)
class HistorySettings:
    enabled: bool = True  # conversations kept on the box (/api/v1/conversations)
    max_db_bytes: int = 1 << 30  # offgridd.db may grow to this; past it, keeping more is refused (507). 0: no bound
    vacuum_seconds: float = 86400.0  # how often freed pages are given back to the card; 0: never


@dataclass(slots=True, kw_only=True)
class UpstreamSettings:
    """An OpenAI-compatible server that may answer what neither this box nor a peer can ([[upstreams]])."""

    url: str  # its base URL, as a client's base_url: "http://gpu-box.lan:8080/v1"
    key: str | None = None  # sent as its bearer key; never a client's key
    models: list[str] = dataclasses.field(default_factory=list)  # the model names it may be asked for ("*": any)


def _list_of_tables(hint) -> type | None:
    """The dataclass of a list-of-tables setting ([[upstreams]]), else None."""
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) is list and args and dataclasses.is_dataclass(args[0]) else None


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
    gpu_layers: int = 0
    flash_attn: bool = True  # llama.cpp's flash attention: faster decode on CPU too (llama-server's "auto")
    max_model_bytes: int = 0  # the largest model this board should load; 0 for no bound
    quantizations: list[str] = dataclasses.field(default_factory=lambda: ["Q4_K_M", "Q4_0", "Q5_K_M", "Q8_0"])
    parallel: int = 1  # requests handed to the worker at once
    queue_depth: int = 16  # requests that may wait beyond those; past it, 503 + Retry-After
    queue_timeout: float = 120.0  # a request that waited this long gets 503
    keep_alive: float = 0.0  # seconds an idle model stays loaded; 0 keeps it loaded
    worker_memory_limit: int = 0  # address-space limit (bytes) for inference workers; 0 for none
    api_key: str | None = None  # when set, /v1/* and /api/* need "Authorization: Bearer <key>"
    admin_key: str | None = None  # when set, state-changing /api/* calls need "Authorization: Bearer <admin key>"
    max_body_bytes: int = 4 << 20
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)  # names besides IPs, localhost, *.local
    cors_origins: list[str] = dataclasses.field(default_factory=list)  # browser origins allowed to call the API
    upstreams: list[UpstreamSettings] = dataclasses.field(default_factory=list)  # off unless configured
    drain_seconds: float = 10.0
    worker_start_timeout: float = 300.0
    log_level: str = "info"
    usb: UsbSettings = dataclasses.field(default_factory=UsbSettings)
    peers: PeerSettings = dataclasses.field(default_factory=PeerSettings)
    hardware: HardwareSettings = dataclasses.field(default_factory=HardwareSettings)
    history: HistorySettings = dataclasses.field(default_factory=HistorySettings)
    voice: VoiceSettings = dataclasses.field(default_factory=VoiceSettings)
    documents: DocumentSettings = dataclasses.field(default_factory=DocumentSettings)

    def validate(self) -> None:
        checks = {
            "port": 0 <= self.port <= 65535,
            "threads": 0 <= self.threads <= 256,
            "ctx": 128 <= self.ctx <= 1 << 20,
            "batch": 1 <= self.batch <= 1 << 16,
            "max_loaded_models": 1 <= self.max_loaded_models <= 64,
            "gpu_layers": self.gpu_layers >= 0,
            "max_model_bytes": self.max_model_bytes >= 0,
            "parallel": 1 <= self.parallel <= 64,
            "queue_depth": 0 <= self.queue_depth <= 4096,
            "queue_timeout": self.queue_timeout > 0,
            "keep_alive": self.keep_alive >= 0,
            "worker_memory_limit": self.worker_memory_limit >= 0,
            "max_body_bytes": self.max_body_bytes >= 1024,
            "drain_seconds": self.drain_seconds >= 0,
            "worker_start_timeout": self.worker_start_timeout > 0,
            "log_level": self.log_level.lower() in ("debug", "info", "warning", "error"),
        }
        checks |= {"documents.max_upload_bytes": self.documents.max_upload_bytes >= 1,
                   "documents.max_total_bytes": self.documents.max_total_bytes >= 0,
                   "documents.chunk_words": 16 <= self.documents.chunk_words <= 1024,
                   "documents.overlap_words": 0 <= self.documents.overlap_words < self.documents.chunk_words,
                   "documents.top_k": 1 <= self.documents.top_k <= 50}
        checks |= {
            "peers.port": 0 <= self.peers.port <= 65535,
            "peers.sync": self.peers.sync in ("off", "pull"),
            "peers.interval": 0.1 <= self.peers.interval <= 3600,
            "peers.bandwidth_limit": self.peers.bandwidth_limit >= 0,
            "usb.poll_seconds": self.usb.poll_seconds > 0,
            "hardware.sample_seconds": self.hardware.sample_seconds > 0,
            "hardware.critical_c": self.hardware.critical_c > self.hardware.throttle_c,
            "hardware.memory_ok": 0 < self.hardware.low_memory < self.hardware.memory_ok < 1,
            "hardware.button_action": self.hardware.button_action in ("shutdown", "none"),
            "voice.threads": 0 <= self.voice.threads <= 256,
            "voice.max_upload_bytes": self.voice.max_upload_bytes >= 1024,
            "voice.max_audio_seconds": self.voice.max_audio_seconds > 0,
            "voice.max_input_chars": self.voice.max_input_chars >= 1,
        }
        checks |= {"history.max_db_bytes": self.history.max_db_bytes >= 0,
                   "history.vacuum_seconds": self.history.vacuum_seconds >= 0}
        for i, upstream in enumerate(self.upstreams):
            if not upstream.url.startswith(("http://", "https://")) or not upstream.models:
                raise SettingsError(f"upstreams[{i}]: 'url' must be an http(s) base URL and 'models' must name the "
                                    f"models it may serve (or \"*\"), got {upstream.url!r} and {upstream.models!r}")
        for key, ok in checks.items():
            if not ok:
                section, _, name = key.rpartition(".")
                value = getattr(getattr(self, section) if section else self, name)
                raise SettingsError(f"setting {key!r} is out of range: {value!r}")

    def public(self) -> dict:
        """Settings as plain JSON-able data, with the secrets masked."""
        out = _plain(self)
        for key in ("api_key", "admin_key"):
            if out[key]:
                out[key] = "***"
        for upstream in out["upstreams"]:
            upstream["key"] = "***" if upstream["key"] else None
        return out


def loopback_for(host: str) -> str:
    """Where a client on this box reaches a daemon listening on `host` (every address: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _plain(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _plain(value)
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            value = [_plain(v) for v in value]
        elif isinstance(value, Path):
            value = str(value)
        out[f.name] = value
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
        elif typing.get_origin(t) is list:
            items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
            if isinstance(items, list) and all(isinstance(v, str) for v in items):
                return items
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise SettingsError(f"{origin}: setting {key!r} must be {names}, got {value!r}")


def _layer(target: dict, data: dict, hints: dict, origin: str, prefix: str = "") -> None:
    """Merge one TOML table into `target`, coercing each value; sections are nested tables."""
    for key, value in data.items():
        if key not in hints:
            raise SettingsError(f"{origin}: unknown setting {prefix + key!r}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise SettingsError(f"{origin}: {prefix + key!r} must be a table ([{prefix + key}])")
            _layer(target.setdefault(key, {}), value, typing.get_type_hints(hint), origin, f"{prefix}{key}.")
        elif (table := _list_of_tables(hint)) is not None:
            if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
                raise SettingsError(f"{origin}: {prefix + key!r} must be a list of tables ([[{prefix + key}]])")
            target[key] = []
            for i, entry in enumerate(value):
                missing = [f.name for f in dataclasses.fields(table)
                           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                           and f.name not in entry]
                if missing:
                    raise SettingsError(f"{origin}: {prefix}{key}[{i}] needs {', '.join(missing)}")
                _layer(item := {}, entry, typing.get_type_hints(table), origin, f"{prefix}{key}[{i}].")
                target[key].append(item)
        else:
            target[key] = _coerce(prefix + key, value, hint, origin)


def _from_env(env: dict[str, str], hints: dict, prefix: str = "") -> dict:
    found: dict = {}
    for key, hint in hints.items():
        if dataclasses.is_dataclass(hint):
            if section := _from_env(env, typing.get_type_hints(hint), f"{prefix}{key}_"):
                found[key] = section
        elif _list_of_tables(hint) is not None:
            continue  # lists of tables come from the config file only
        elif (name := f"{ENV_PREFIX}{prefix}{key}".upper()) in env:
            found[key] = _coerce(f"{prefix}{key}".replace("_", ".", 1) if prefix else key, env[name], hint,
                                 f"environment {name}")
    return found


def _build(cls, values: dict):
    hints = typing.get_type_hints(cls)

    def build(hint, value):
        if dataclasses.is_dataclass(hint):
            return _build(hint, value)
        if (table := _list_of_tables(hint)) is not None:
            return [_build(table, v) for v in value]
        return value

    return cls(**{k: build(hints[k], v) for k, v in values.items()})


def load_settings(config: Path | None = None, env: dict[str, str] | None = None, flags: dict | None = None,
                  base: dict | None = None) -> Settings:
    """Build the settings from every layer; a bad value is an error that names its key and layer.

    `base` is the board profile's layer: above the defaults, below everything a person configured.
    """
    env = os.environ if env is None else env
    hints = typing.get_type_hints(Settings)
    values: dict[str, object] = {}
    if base:
        _layer(values, base, hints, "board profile")

    path = config or (Path(env[f"{ENV_PREFIX}CONFIG"]) if env.get(f"{ENV_PREFIX}CONFIG") else DEFAULT_CONFIG)
    if config is not None or path != DEFAULT_CONFIG or path.exists():
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise SettingsError(f"config file {path} does not exist") from None
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise SettingsError(f"config file {path}: {e}") from None
        _layer(values, data, hints, f"config file {path}")

    for key, value in _from_env(env, hints).items():
        if isinstance(value, dict):
            values.setdefault(key, {}).update(value)
        else:
            values[key] = value

    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, hints[key], f"flag --{key}") if isinstance(value, str) else value

    try:
        settings = _build(Settings, values)
    except TypeError as e:
        raise SettingsError(str(e)) from None
    settings.validate()
    return settings
