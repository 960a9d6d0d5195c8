"""Knowing the board: profiles, resource samples, the degradation ladder, the status LED."""

from __future__ import annotations

from pathlib import Path

from ..settings import Settings, load_settings
from .profiles import Detection, Profile, ProfileError, detect, load_profiles, profiles_dir

__all__ = ["Detection", "Profile", "ProfileError", "detect", "load_profiles", "settings_for_board"]


def settings_for_board(config: Path | None = None, env: dict | None = None, flags: dict | None = None,
                       root: Path | None = None) -> tuple[Settings, Detection]:
    """Settings with the detected board's profile as a layer under the config file, env and flags."""
    first = load_settings(config=config, env=env, flags=flags)
    hw = first.hardware
    detection = detect(root or hw.root, load_profiles(profiles_dir(hw.profiles_dir)), hw.profile)
    return load_settings(config=config, env=env, flags=flags, base=detection.profile.settings_layer()), detection
