"""Push to talk, for the appliance with no screen: hold the button to record, release it to have the recording
transcribed, answered by the default model and spoken, all on the box.

Recording and playback are commands (ALSA's `arecord` and `aplay` by default, `voice.capture_command` and
`voice.playback_command`), so a USB speakerphone is one `-D` away and tests use a file-backed device. The button
comes through gpiozero; its callbacks run in gpiozero's thread and only hand the edge to the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
from collections.abc import Awaitable, Callable

from ..inference import Token
from ..settings import VoiceSettings

log = logging.getLogger(__name__)

ANSWER_TOKENS = 200  # a spoken answer: a few sentences
READ_BLOCK = 64 << 10


async def answer_with(generate, text: str) -> str:
    """The default model's answer to one spoken question (Inference.generate)."""
    generation = await generate(None, messages=[{"role": "user", "content": text}],
                                params={"max_tokens": ANSWER_TOKENS})
    async with generation:
        return "".join([event.text async for event in generation if isinstance(event, Token)]).strip()


class PushToTalk:
    """`voice` transcribes and speaks (VoiceService), `answer` turns a question into the text to speak."""

    def __init__(self, settings: VoiceSettings, voice, answer: Callable[[str], Awaitable[str]], pin_factory=None):
        self.settings, self.voice, self.answer, self.pin_factory = settings, voice, answer, pin_factory
        self.state = "idle"  # idle | recording | thinking | speaking
        self.last: dict = {}  # what was heard and said the last time
        self.error: str | None = None
        self._button = None
        self._recorder: asyncio.subprocess.Process | None = None
        self._reading: asyncio.Task | None = None
        self._turn: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        from gpiozero import Button

        self._loop = asyncio.get_running_loop()
        self._button = Button(self.settings.button_pin, bounce_time=0.03, pin_factory=self.pin_factory)
        self._button.when_pressed = lambda *_: self._loop.call_soon_threadsafe(self.pressed)
        self._button.when_released = lambda *_: self._loop.call_soon_threadsafe(self.released)
        log.info("push to talk on GPIO %s: hold to speak a question", self.settings.button_pin)

    async def stop(self) -> None:
        if self._button is not None:
            self._button.close()
        for task in (self._turn, self._reading):
            if task is not None:
                task.cancel()
        await self._kill_recorder()

    def describe(self) -> dict:
        return {"button_pin": self.settings.button_pin, "state": self.state, "last": self.last, "error": self.error}

    def pressed(self) -> None:
        """Start recording, unless a question is still being answered (then the press is ignored)."""
        if self.state != "idle":
            return
        self.state = "recording"
        self._reading = asyncio.create_task(self._record(), name="push-to-talk record")

    def released(self) -> None:
        if self.state != "recording" or self._reading is None:
            return
        self.state = "thinking"
        self._turn = asyncio.create_task(self._answer(self._reading), name="push-to-talk answer")

    async def _record(self) -> bytes:
        self._recorder = await asyncio.create_subprocess_exec(
            *shlex.split(self.settings.capture_command), stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL)
        if self.state != "recording":  # released before the recorder even started
            await self._kill_recorder()
        audio = bytearray()
        while block := await self._recorder.stdout.read(READ_BLOCK):
            if len(audio) < self.settings.max_upload_bytes:  # past the limit: keep draining, keep nothing more
                audio += block
        await self._recorder.wait()
        return bytes(audio)

    async def _kill_recorder(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is not None and recorder.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                recorder.terminate()  # arecord ends its file cleanly on SIGTERM
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2):
                    await recorder.wait()
            if recorder.returncode is None:
                recorder.kill()

    async def _answer(self, reading: asyncio.Task) -> None:
        try:
            # a recorder that already ended (a file) has all it will give; a live one is stopped by the release
            await asyncio.sleep(0)
            await self._kill_recorder()
            audio = await reading
            heard = (await self.voice.transcribe(None, audio)).text
            self.last = {"heard": heard}
            if not heard:
                return
            said = await self.answer(heard)
            self.last["said"] = said
            if said:
                self.state = "speaking"
                await self._play(said)
            self.error = None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one failed turn must leave the button working
            self.error = f"{type(e).__name__}: {e}"
            log.warning("push to talk: %s", self.error)
        finally:
            self.state = "idle"

    async def _play(self, text: str) -> None:
        engine, speaker = await self.voice.voice_for(None, "alloy")
        player = await asyncio.create_subprocess_exec(*shlex.split(self.settings.playback_command),
                                                      stdin=asyncio.subprocess.PIPE,
                                                      stderr=asyncio.subprocess.DEVNULL)
        try:
            async for block in self.voice.speak(engine, speaker, text, fmt="wav"):
                player.stdin.write(block)
                await player.stdin.drain()
        finally:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                player.stdin.close()
            await player.wait()
