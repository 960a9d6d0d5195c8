"""The speech engines, loaded from a verified bundle in the store: faster-whisper (CTranslate2) hears, piper (VITS
on onnxruntime) speaks. Both are native code that releases the GIL; every call here blocks and runs in the voice
executor, never on the event loop."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..store import BundleInfo, read_bundle_info, read_member

# OpenAI answers verbose_json with the language's English name
LANGUAGE_NAMES = {"en": "english", "de": "german", "fr": "french", "es": "spanish", "it": "italian",
                  "pt": "portuguese", "nl": "dutch", "pl": "polish", "ru": "russian", "uk": "ukrainian",
                  "zh": "chinese", "ja": "japanese", "ko": "korean", "ar": "arabic", "hi": "hindi", "tr": "turkish",
                  "sv": "swedish", "da": "danish", "no": "norwegian", "fi": "finnish", "cs": "czech", "el": "greek"}


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float
    end: float


@dataclass(frozen=True, slots=True)
class Segment:
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Transcript:
    model: str
    text: str
    language: str  # the English name, as OpenAI's verbose_json gives it
    duration: float  # seconds of audio
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] | None = None  # only when word timestamps were asked for
    seconds: float = 0.0  # how long transcribing took


class SpeechToText:
    """A Whisper model in CTranslate2 format, read from its bundle in memory (no unpacked copy on the card)."""

    def __init__(self, name: str, path: Path, threads: int):
        from faster_whisper import WhisperModel  # imported here: loading it costs ~1 s that a box without voice skips

        info = read_bundle_info(path)
        files = {member: read_member(path, info, member) for member in info.members if member != "offgrid-bundle.json"}
        self.name, self.info = name, info
        self.english_only = (info.language or "").startswith("en") and ".en" in name
        self.model = WhisperModel(f"offgridd:{name}", device="cpu", compute_type="int8", cpu_threads=threads,
                                  files=files)
        try:  # prove the engine on a second of silence before saying it is loaded, as the LLM worker does
            list(self.model.transcribe(np.zeros(16000, np.float32), language="en")[0])
        except RuntimeError as e:
            hint = ""
            if "primitive" in str(e):
                hint = ("; CTranslate2's x86-64 build compiles its kernels at run time and needs memory that is "
                        "writable and executable, which MemoryDenyWriteExecute=yes forbids (docs/voice.md says how "
                        "to allow it for speech to text)")
            raise RuntimeError(f"the speech-to-text engine failed its self-test: {e}{hint}") from None

    def transcribe(self, audio: np.ndarray, *, language: str | None, prompt: str | None, temperature: float | None,
                   words: bool) -> Transcript:
        kwargs = {} if temperature is None else {"temperature": temperature}
        segments, info = self.model.transcribe(audio, language=language or ("en" if self.english_only else None),
                                               initial_prompt=prompt or None, word_timestamps=words,
                                               condition_on_previous_text=False, **kwargs)
        out, found = [], []
        for s in segments:
            out.append(Segment(id=len(out), seek=s.seek, start=round(s.start, 2),
                               end=round(s.end, 2), text=s.text, tokens=list(s.tokens),
                               temperature=float(s.temperature or 0.0), avg_logprob=float(s.avg_logprob),
                               compression_ratio=float(s.compression_ratio), no_speech_prob=float(s.no_speech_prob)))
            if words and s.words:
                found += [Word(w.word.strip(), round(float(w.start), 2), round(float(w.end), 2)) for w in s.words]
        return Transcript(model=self.name, text="".join(s.text for s in out).strip(),
                          language=LANGUAGE_NAMES.get(info.language, info.language), duration=round(info.duration, 3),
                          segments=out, words=found if words else None)


class TextToSpeech:
    """A piper voice, its ONNX graph handed to onnxruntime from the bundle's bytes."""

    def __init__(self, name: str, path: Path, threads: int):
        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        info: BundleInfo = read_bundle_info(path)
        config = json.loads(read_member(path, info, "voice.onnx.json"))
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # idle threads sleep instead of spinning: on 2 cores shared with llama.cpp, spinning cost a third
        # (measured RTF 0.151 spinning, 0.111 not, on this machine under load)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(read_member(path, info, "voice.onnx"), sess_options=options,
                                               providers=["CPUExecutionProvider"])
        self.name, self.info = name, info
        self.voice = PiperVoice(config=PiperConfig.from_dict(config), session=session)
        self.sample_rate = self.voice.config.sample_rate
        # the voice's own name (en_US-joe-medium: joe) and its speakers, where it has several
        self.speakers = dict(self.voice.config.speaker_id_map or {})
        self.voice_name = str(config.get("dataset") or name)

    def speaker(self, voice: str) -> int | None:
        """The speaker id for a voice name, None for the voice's default; KeyError if the voice has no such one."""
        if voice in self.speakers:
            return self.speakers[voice]
        raise KeyError(voice)

    def synthesize(self, text: str, *, speaker: int | None, speed: float,
                   stop: threading.Event | None = None) -> Iterator[np.ndarray]:
        """Float samples in [-1, 1], one array per sentence as piper makes them."""
        from piper.config import SynthesisConfig

        config = SynthesisConfig(speaker_id=speaker, length_scale=(self.voice.config.length_scale or 1.0) / speed)
        for chunk in self.voice.synthesize(text, syn_config=config):
            if stop is not None and stop.is_set():
                return
            yield chunk.audio_float_array
