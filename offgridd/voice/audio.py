"""Audio in and out: an upload decoded to 16 kHz mono for Whisper, bounded in length; speech encoded as it is made.

Uploads are hostile: FFmpeg (PyAV) reads them only when their container is one of `CONTAINERS` (what OpenAI accepts,
and what browsers record), and decoding stops as soon as the audio runs past the limit, so a long file costs no more
than the limit. Blocks (decoding, encoding): callers run these in the voice executor.
"""

from __future__ import annotations

import io
import resource
import struct

import av
import numpy as np

WHISPER_RATE = 16000
PCM_RATE = 24000  # OpenAI's "pcm" is 24 kHz, 16-bit signed little-endian, mono
# FFmpeg's names of the containers OpenAI accepts (flac mp3 mp4 mpeg mpga m4a ogg wav webm) and browsers record
CONTAINERS = {"wav", "mp3", "flac", "ogg", "matroska", "webm", "mov", "mp4", "m4a", "3gp", "aac", "mpeg", "aiff",
              "caf"}
FORMATS = ("wav", "pcm", "mp3", "opus", "aac", "flac")
CONTENT_TYPES = {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg; codecs=opus",
                 "aac": "audio/aac", "flac": "audio/flac"}
_AV_OUT = {"mp3": ("mp3", "libmp3lame", None), "opus": ("ogg", "libopus", 48000), "aac": ("adts", "aac", None),
           "flac": ("flac", "flac", None)}


DECODER_MEMORY_BYTES = 2 << 30  # the decoder child's address space (not its memory): a 600 s upload uses ~250 MB


def bound_memory() -> None:
    """In the decoder child: a file that makes FFmpeg allocate without end fails there, with MemoryError."""
    try:
        resource.setrlimit(resource.RLIMIT_AS, (DECODER_MEMORY_BYTES, DECODER_MEMORY_BYTES))
    except (OSError, ValueError):  # the unit filters setrlimit (~@resources); its MemoryMax still bounds us
        pass


class AudioError(Exception):
    """The upload is not audio this box can read; the message says why."""


class AudioTooLong(AudioError):
    pass


def decode(data: bytes, max_seconds: float) -> np.ndarray:
    """An upload as float32 samples at 16 kHz mono; AudioError if unreadable, AudioTooLong past `max_seconds`."""
    limit = int(max_seconds * WHISPER_RATE)
    try:
        container = av.open(io.BytesIO(data), mode="r", metadata_errors="ignore")
    except (av.FFmpegError, ValueError, OSError) as e:
        raise AudioError(f"not an audio file this box can read ({_why(e)}); send flac, m4a, mp3, mp4, mpeg, mpga, "
                         "oga, ogg, wav or webm") from None
    with container:
        names = set(container.format.name.split(","))
        if not names & CONTAINERS:
            raise AudioError(f"{container.format.name} files are not accepted; send flac, m4a, mp3, mp4, mpeg, mpga, "
                             "oga, ogg, wav or webm")
        if not container.streams.audio:
            raise AudioError("the file has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=WHISPER_RATE)
        parts, n = [], 0
        try:
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    parts.append(out.to_ndarray().reshape(-1))
                    n += parts[-1].size
                if n > limit:
                    raise AudioTooLong(f"the audio is longer than this box transcribes in one request "
                                       f"({max_seconds:.0f} s, voice.max_audio_seconds); split it")
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
        except av.FFmpegError as e:
            if not parts:
                raise AudioError(f"the audio could not be decoded ({_why(e)})") from None
            # a damaged tail after good audio: transcribe what was readable, as Whisper's own reader does
    if not parts:
        raise AudioError("the file holds no audio samples")
    return np.concatenate(parts).astype(np.float32) / 32768.0


def _why(e: Exception) -> str:
    return (getattr(e, "strerror", None) or str(e) or type(e).__name__)[:160]


def to_int16(samples: np.ndarray) -> np.ndarray:
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")


class Encoder:
    """Speech bytes in one response format, produced piece by piece as the samples arrive."""

    def __init__(self, fmt: str, sample_rate: int):
        if fmt not in FORMATS:
            raise ValueError(fmt)
        self.format, self.rate = fmt, sample_rate
        self.content_type = CONTENT_TYPES[fmt]
        self._resampler = None
        self._out = self._container = self._stream = None
        if fmt == "pcm" and sample_rate != PCM_RATE:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_RATE)
        elif fmt in _AV_OUT:
            container, codec, rate = _AV_OUT[fmt]
            self._out = io.BytesIO()
            self._container = av.open(self._out, mode="w", format=container)
            self._stream = self._container.add_stream(codec, rate=rate or sample_rate, layout="mono")
            if rate and rate != sample_rate:
                self._resampler = av.AudioResampler(format=self._stream.format.name, layout="mono", rate=rate)

    def start(self) -> bytes:
        if self.format == "wav":
            return wav_header(self.rate)
        return b""

    def add(self, samples: np.ndarray) -> bytes:
        pcm = to_int16(samples)
        if self.format == "wav":
            return pcm.tobytes()
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.rate
        if self.format == "pcm":
            if self._resampler is None:
                return pcm.tobytes()
            return b"".join(f.to_ndarray().tobytes() for f in self._resampler.resample(frame))
        return self._encode(frame)

    def end(self) -> bytes:
        if self.format == "pcm" and self._resampler is not None:
            return b"".join(f.to_ndarray().tobytes() for f in self._resampler.resample(None))
        if self._container is None:
            return b""
        tail = self._encode(None)
        self._container.close()
        return tail + self._drain()

    def _encode(self, frame) -> bytes:
        frames = [frame] if frame is not None else [None]
        if self._resampler is not None:
            frames = self._resampler.resample(frame) + ([None] if frame is None else [])
        for f in frames:
            for packet in self._stream.encode(f):
                self._container.mux(packet)
        return self._drain()

    def _drain(self) -> bytes:
        data = self._out.getvalue()
        self._out.seek(0)
        self._out.truncate()
        return data


def wav_header(sample_rate: int, data_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 16-bit mono WAV header; the default sizes are the 'unknown length' a stream sends, which players accept."""
    riff = min(0xFFFFFFFF, data_bytes + 36)
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                             sample_rate * 2, 2, 16)
            + b"data" + struct.pack("<I", data_bytes))
