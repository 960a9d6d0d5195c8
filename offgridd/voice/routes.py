"""HTTP: OpenAI's audio endpoints, shaped as OpenAI's so its clients (the openai package, Open WebUI, LibreChat) work
unchanged. POST /v1/audio/transcriptions (multipart) answers json, text, srt, vtt or verbose_json; POST
/v1/audio/speech streams the audio as it is synthesized."""

from __future__ import annotations

import math

from aiohttp import BodyPartReader, web

from ..web import ApiError, read_json
from .audio import CONTENT_TYPES, FORMATS
from .engines import Transcript
from .service import VoiceError, VoiceService

VOICE = web.AppKey("voice", VoiceService)
FIELD_LIMIT = 64 << 10  # a form field other than the file (a prompt is a few hundred tokens)
READ_BLOCK = 256 << 10
TRANSCRIPT_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


def _voice(request: web.Request) -> VoiceService:
    if (voice := request.app.get(VOICE)) is None:
        raise ApiError(503, "speech is off on this box (voice.enabled = false)", code="voice_disabled")
    return voice


def _translate(e: VoiceError) -> ApiError:
    return ApiError(e.status, str(e), param=e.param, code=e.code)


async def _read_form(request: web.Request, limit: int) -> tuple[bytes | None, dict[str, list[str]]]:
    """The upload and the other fields of a multipart form, each bounded while it is read."""
    if not request.content_type.startswith("multipart/form-data"):
        raise ApiError(400, "send multipart/form-data with the audio in a 'file' field (as OpenAI's API takes it)",
                       param="file")
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError) as e:
        raise ApiError(400, f"the multipart body cannot be read: {e}") from None
    upload, fields = None, {}
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader) or not part.name:
            raise ApiError(400, "nested or unnamed multipart parts are not accepted")
        is_file = part.name == "file"
        bound = limit if is_file else FIELD_LIMIT
        data = bytearray()
        while block := await part.read_chunk(READ_BLOCK):
            data += block
            if len(data) > bound:
                if is_file:
                    raise ApiError(413, f"the audio file is over {limit >> 20} MB (voice.max_upload_bytes)",
                                   param="file", code="request_too_large")
                raise ApiError(400, f"the field {part.name[:40]!r} is over {bound} bytes", param=part.name[:40])
        if is_file:
            upload = bytes(data)
        else:
            try:
                fields.setdefault(part.name.removesuffix("[]"), []).append(data.decode())
            except UnicodeDecodeError:
                raise ApiError(400, f"the field {part.name[:40]!r} is not UTF-8 text", param=part.name[:40]) from None
    return upload, fields


def _one(fields: dict[str, list[str]], name: str) -> str | None:
    values = fields.get(name)
    return values[-1] if values else None


async def transcriptions(request: web.Request) -> web.StreamResponse:
    voice = _voice(request)
    upload, fields = await _read_form(request, voice.settings.max_upload_bytes)
    if not upload:
        raise ApiError(400, "no audio: send it in the 'file' field", param="file")
    fmt = _one(fields, "response_format") or "json"
    if fmt not in TRANSCRIPT_FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(TRANSCRIPT_FORMATS)}", param="response_format")
    granularities = fields.get("timestamp_granularities", [])
    if bad := [g for g in granularities if g not in ("segment", "word")]:
        raise ApiError(400, f"timestamp_granularities takes 'segment' and 'word', not {bad[0][:20]!r}",
                       param="timestamp_granularities")
    if granularities and fmt != "verbose_json":
        raise ApiError(400, "timestamp_granularities needs response_format verbose_json",
                       param="timestamp_granularities")
    temperature = _one(fields, "temperature")
    try:
        temperature = float(temperature) if temperature not in (None, "") else None
    except ValueError:
        temperature = math.nan
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise ApiError(400, "temperature must be a number from 0 to 1", param="temperature")
    language = _one(fields, "language") or None
    if language is not None and not (language.isalpha() and 2 <= len(language) <= 3):
        raise ApiError(400, "language must be an ISO-639-1 code such as 'en'", param="language")
    try:
        result = await voice.transcribe(_one(fields, "model"), upload, language=language,
                                        prompt=_one(fields, "prompt"), temperature=temperature,
                                        words="word" in granularities)
    except VoiceError as e:
        raise _translate(e) from None
    return _transcript_response(result, fmt, granularities)


def _transcript_response(t: Transcript, fmt: str, granularities: list[str]) -> web.Response:
    usage = {"type": "duration", "seconds": math.ceil(t.duration)}
    if fmt == "json":
        return web.json_response({"text": t.text, "usage": usage})
    if fmt == "text":
        return web.Response(text=t.text + "\n", content_type="text/plain")
    if fmt == "srt":
        blocks = [f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n"
                  for i, s in enumerate(t.segments, 1)]
        return web.Response(text="\n".join(blocks) + "\n", content_type="application/x-subrip")
    if fmt == "vtt":
        blocks = [f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments]
        return web.Response(text="WEBVTT\n\n" + "\n".join(blocks) + "\n", content_type="text/vtt")
    body = {"task": "transcribe", "language": t.language, "duration": t.duration, "text": t.text}
    if not granularities or "segment" in granularities:
        body["segments"] = [{"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
                             "tokens": s.tokens, "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                             "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob}
                            for s in t.segments]
    if t.words is not None:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    body["usage"] = usage
    return web.json_response(body)


def _stamp(seconds: float, mark: str) -> str:
    ms = max(0, round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{mark}{ms % 1000:03d}"


async def speech(request: web.Request) -> web.StreamResponse:
    voice = _voice(request)
    body = await read_json(request)
    text = body.get("input")
    if not isinstance(text, str) or not text.strip():
        raise ApiError(400, "'input' must be the text to speak", param="input")
    limit = voice.settings.max_input_chars
    if len(text) > limit:
        raise ApiError(400, f"'input' is {len(text)} characters; at most {limit} are spoken in one request",
                       param="input", code="string_above_max_length")
    name = body.get("voice")
    if isinstance(name, dict):  # the newer API's {"id": ...} for custom voices
        name = name.get("id")
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'voice' is required: alloy, echo, ... (OpenAI's voices use this box's default voice) or "
                       "a voice of the model", param="voice")
    fmt = body.get("response_format", "mp3")
    if fmt not in FORMATS:
        raise ApiError(400, f"response_format must be one of {', '.join(FORMATS)}", param="response_format")
    if body.get("stream_format", "audio") != "audio":
        raise ApiError(400, "stream_format 'sse' is not supported here; the audio itself is streamed",
                       param="stream_format")
    speed = body.get("speed", 1.0)
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not 0.25 <= speed <= 4.0:
        raise ApiError(400, "speed must be a number from 0.25 to 4.0", param="speed")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "'model' must be a string", param="model")
    try:
        engine, speaker = await voice.voice_for(model, name)
    except VoiceError as e:
        raise _translate(e) from None
    audio = voice.speak(engine, speaker, text, speed=float(speed), fmt=fmt)
    try:
        first = await anext(audio)  # waits for a slot: a full queue is still a plain 503 here
    except StopAsyncIteration:
        first = b""
    resp = web.StreamResponse(headers={"Content-Type": CONTENT_TYPES[fmt], "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        await resp.write(first)
        async for block in audio:
            await resp.write(block)
    finally:
        await audio.aclose()
    await resp.write_eof()
    return resp


def setup_routes(app: web.Application, voice: VoiceService | None) -> None:
    if voice is not None:
        app[VOICE] = voice
    app.router.add_post("/v1/audio/transcriptions", transcriptions)
    app.router.add_post("/v1/audio/speech", speech)
