"""Board profiles: data files in hw-profiles/ that say how to recognise a board and what to run there."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .probe import BoardFacts, board_facts

# where profile files are looked for, first match wins: the source tree, then the image's install location
SEARCH_PATH = (Path(__file__).resolve().parents[2] / "hw-profiles", Path("/usr/share/offgridd/hw-profiles"))

# profile [run]/[thermal]/[gpio] keys -> settings keys ("section.key" for a settings section)
SETTINGS_KEYS = {
    ("run", "threads"): "threads", ("run", "ctx"): "ctx", ("run", "batch"): "batch",
    ("run", "gpu_layers"): "gpu_layers", ("run", "max_model_bytes"): "max_model_bytes",
    ("run", "quantizations"): "quantizations", ("run", "parallel"): "parallel",
    ("run", "queue_depth"): "queue_depth", ("run", "keep_alive"): "keep_alive",
    ("thermal", "throttle_c"): "hardware.throttle_c", ("thermal", "critical_c"): "hardware.critical_c",
    ("gpio", "led"): "hardware.led_pin", ("gpio", "button"): "hardware.button_pin",
    ("voice", "enabled"): "voice.enabled", ("voice", "stt_model"): "voice.stt_model",
    ("voice", "tts_model"): "voice.tts_model", ("voice", "beside_decoding"): "voice.beside_decoding",
    ("storage", "max_db_bytes"): "history.max_db_bytes",
    ("storage", "max_upload_bytes"): "documents.max_upload_bytes",
    ("storage", "max_documents_bytes"): "documents.max_total_bytes",
}
TABLES = ("run", "thermal", "gpio", "voice", "storage")
MATCH_KEYS = ("device_tree_model", "nv_tegra_release", "mem_mb", "arch", "cpu_flags")


class ProfileError(ValueError):
    """A profile file is unreadable or names a key offgridd does not know."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    id: str
    name: str
    generic: bool
    match: dict
    values: dict  # the profile's [run]/[thermal]/[gpio]/[voice]/[storage] tables
    path: Path

    def settings_layer(self) -> dict:
        """The profile as a settings layer (below the config file, which always wins)."""
        layer: dict = {}
        for (table, key), target in SETTINGS_KEYS.items():
            if key in self.values.get(table, {}):
                section, _, name = target.rpartition(".")
                (layer.setdefault(section, {}) if section else layer)[name] = self.values[table][key]
        return layer


@dataclass(frozen=True, slots=True, kw_only=True)
class Detection:
    profile: Profile
    evidence: list[str]
    reason: str
    facts: BoardFacts
    forced: bool = False
    candidates: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"id": self.profile.id, "name": self.profile.name, "evidence": self.evidence, "reason": self.reason,
                "forced": self.forced, "board": {
                    "device_tree_model": self.facts.device_tree_model, "nv_tegra_release": self.facts.nv_tegra_release,
                    "mem_total_mb": self.facts.mem_total_mb, "arch": self.facts.arch}}


def profiles_dir(configured: Path | None) -> Path:
    if configured is not None:
        return configured
    for candidate in SEARCH_PATH:
        if candidate.is_dir():
            return candidate
    raise ProfileError(f"no hw-profiles directory found in {', '.join(map(str, SEARCH_PATH))}")


def load_profiles(directory: Path) -> list[Profile]:
    out = []
    for path in sorted(directory.glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ProfileError(f"profile {path.name}: {e}") from None
        unknown = set(data.get("match", {})) - set(MATCH_KEYS)
        unknown |= {f"{t}.{k}" for t in TABLES for k in data.get(t, {})
                    if (t, k) not in SETTINGS_KEYS}
        if unknown or "id" not in data:
            raise ProfileError(f"profile {path.name}: unknown keys {sorted(unknown)}" if unknown else
                               f"profile {path.name}: no id")
        out.append(Profile(id=data["id"], name=data.get("name", data["id"]), generic=bool(data.get("generic")),
                           match=data.get("match", {}),
                           values={t: data.get(t, {}) for t in TABLES}, path=path))
    return out


def _matches(profile: Profile, facts: BoardFacts) -> list[str] | None:
    """The evidence for each match condition, or None when one fails."""
    evidence = []
    m = profile.match
    if "device_tree_model" in m:
        if not facts.device_tree_model or m["device_tree_model"] not in facts.device_tree_model:
            return None
        evidence.append(f"device-tree model {facts.device_tree_model!r} contains {m['device_tree_model']!r}")
    if "nv_tegra_release" in m:
        if not facts.nv_tegra_release or m["nv_tegra_release"] not in facts.nv_tegra_release:
            return None
        evidence.append(f"/etc/nv_tegra_release {facts.nv_tegra_release.splitlines()[0]!r}")
    if "mem_mb" in m:
        lo, hi = m["mem_mb"]
        if not lo <= facts.mem_total_mb <= hi:
            return None
        evidence.append(f"MemTotal {facts.mem_total_mb} MB within {lo}-{hi} MB")
    if "arch" in m:
        if facts.arch != m["arch"]:
            return None
        evidence.append(f"CPU architecture {facts.arch}")
    if "cpu_flags" in m:
        if not set(m["cpu_flags"]) <= facts.cpu_flags:
            return None
        evidence.append(f"CPU flags include {', '.join(m['cpu_flags'])}")
    return evidence


def detect(root: Path, profiles: list[Profile], forced: str | None = None) -> Detection:
    """The most specific matching profile; an unknown board gets its architecture's generic profile."""
    facts = board_facts(root)
    by_id = {p.id: p for p in profiles}
    if forced:
        if forced not in by_id:
            raise ProfileError(f"profile {forced!r} does not exist; known: {', '.join(sorted(by_id))}")
        return Detection(profile=by_id[forced], evidence=["set in the configuration"], reason="forced by config",
                         facts=facts, forced=True)
    scored = []
    for p in profiles:
        if (evidence := _matches(p, facts)) is not None:
            scored.append((not p.generic, len(evidence), p.id, p, evidence))
    if not scored:
        raise ProfileError(f"no profile matches this board (arch {facts.arch}) and no generic profile for it")
    scored.sort(reverse=True)
    _, _, _, best, evidence = scored[0]
    if best.generic:
        board = repr(facts.device_tree_model) if facts.device_tree_model else "a board with no device-tree model"
        reason = f"no board profile matched {board}; using the generic {facts.arch} profile"
    else:
        reason = f"matched {best.name}"
    return Detection(profile=best, evidence=evidence, reason=reason, facts=facts,
                     candidates=[s[2] for s in scored])
