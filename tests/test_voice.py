"""The box listens and speaks (#15): speech models stored and verified like GGUFs, OpenAI's audio endpoints tested
with the official openai client against a real daemon, and speech taking its turn in the same queue as chat."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from conftest import http, private_state, running_daemon
from gguf_factory import gguf_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offgridd.inference import Admission, Overloaded, Token
from offgridd.jobs import JobBoard
from offgridd.settings import VoiceSettings
from offgridd.store import BundleError, ModelStore, StoreError, bundle_chunks, read_bundle_info
from offgridd.voice import VoiceError, VoiceService
from offgridd.voice.audio import decode
from offgridd.voice.engines import Transcript

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."
STT_META = {"kind": "stt", "engine": "faster-whisper", "architecture": "whisper", "quantization": "ctranslate2",
            "language": "en"}


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def recovered(said: str, heard: str) -> float:
    """The share of the sentence's words found in the transcription."""
    want, got = words(said), set(words(heard))
    return sum(w in got for w in want) / len(want)


# --- the store: a speech model is one verified bundle blob with a kind -----------------------------------------------

def fake_files(tmp_path: Path, engine: str = "faster-whisper") -> dict[str, Path]:
    names = ["model.bin", "config.json", "tokenizer.json"] if engine == "faster-whisper" else \
        ["voice.onnx", "voice.onnx.json"]
    out = {}
    for name in names:
        (tmp_path / name).write_bytes(hashlib.sha256(name.encode()).digest() * 50)
        out[name] = tmp_path / name
    return out


def bundle_bytes(tmp_path: Path, meta: dict = STT_META, engine: str = "faster-whisper") -> bytes:
    return b"".join(bundle_chunks(meta, fake_files(tmp_path, engine)))


@pytest.fixture
def store(tmp_path) -> ModelStore:
    s = ModelStore(tmp_path / "models")
    s.open()
    return s


def test_a_speech_bundle_enters_the_store_with_its_kind_and_is_listed_by_kind(store, tmp_path):
    data = bundle_bytes(tmp_path)
    m = store.import_chunks([data], name="whisper-test", source="test", kind="stt",
                            expected_sha256=hashlib.sha256(data).hexdigest(), expected_size=len(data))
    assert (m.kind, m.engine, m.architecture, m.language) == ("stt", "faster-whisper", "whisper", "en")
    assert [x.name for x in store.list(kind="stt")] == ["whisper-test"] and store.list(kind="llm") == []
    assert store.verify("whisper-test") == (True, m.sha256)


def test_a_bundle_offered_with_no_kind_is_recognised_as_sticks_and_peers_offer_it(store, tmp_path):
    data = bundle_bytes(tmp_path, {**STT_META, "kind": "tts", "engine": "piper", "architecture": "vits"}, "piper")
    m = store.import_chunks(iter([data[:1000], data[1000:]]), name="voice", source="peer:test")
    assert m.kind == "tts" and m.engine == "piper"


def test_a_peer_pull_of_a_speech_model_that_breaks_off_resumes_and_commits_it_with_its_kind(store, tmp_path):
    data = bundle_bytes(tmp_path)
    partial = store.root / "sha256-pull.part"  # as the peer puller passes it: resumable, no kind

    def broken():
        yield data[:5000]
        raise ConnectionError("the peer went away")

    with pytest.raises(ConnectionError):
        store.import_chunks(broken(), name="pulled", source="peer:b", partial=partial,
                            expected_sha256=hashlib.sha256(data).hexdigest(), expected_size=len(data))
    assert partial.stat().st_size == 5000 and store.list() == []
    m = store.import_chunks([data[5000:]], name="pulled", source="peer:b", partial=partial,
                            expected_sha256=hashlib.sha256(data).hexdigest(), expected_size=len(data))
    assert m.kind == "stt" and not partial.exists()


def test_the_same_files_make_the_same_bundle_on_every_box(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert bundle_bytes(tmp_path / "a") == bundle_bytes(tmp_path / "b")


def test_a_tampered_bundle_is_refused_by_its_checksum_and_nothing_is_left(store, tmp_path):
    data = bundle_bytes(tmp_path)
    digest = hashlib.sha256(data).hexdigest()
    bad = bytearray(data)
    bad[3000] ^= 1
    with pytest.raises(StoreError, match="sha256 mismatch"):
        store.import_chunks([bytes(bad)], name="w", source="test", expected_sha256=digest)
    assert store.list() == [] and not list(store.blobs.iterdir()) and not list(store.staging.iterdir())


def test_kind_llm_still_demands_a_gguf_and_a_gguf_is_no_speech_model(store, tmp_path):
    with pytest.raises(StoreError, match="not a usable GGUF model"):
        store.import_chunks([bundle_bytes(tmp_path)], name="w", source="test", kind="llm")
    with pytest.raises(StoreError, match="not a usable speech model bundle"):
        store.import_chunks([gguf_bytes()], name="g", source="test", kind="stt")
    with pytest.raises(StoreError, match="holds a stt model"):
        store.import_chunks([bundle_bytes(tmp_path)], name="w", source="test", kind="tts")
    assert store.import_chunks([gguf_bytes()], name="g", source="test").kind == "llm"
    assert store.list() and not list(store.staging.iterdir())


def test_manifests_written_before_kinds_existed_read_as_llm(store):
    old = {"name": "old", "sha256": "a" * 64, "size": 1, "architecture": "llama", "quantization": "Q4_0",
           "context_length": 2048, "has_chat_template": True}
    (store.manifests / "old.json").write_text(json.dumps(old))
    assert store.get("old").kind == "llm" and store.list(kind="llm")[0].engine == "llama.cpp"


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def _member(name: str, kind=tarfile.REGTYPE, **extra) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in extra.items():
        setattr(info, k, v)
    return info


META_BYTES = json.dumps({"format": 1, **STT_META}).encode()


@pytest.mark.parametrize("members, reason", [
    ([(_member("model.bin"), b"x")], "first file must be offgrid-bundle.json"),
    ([(_member("offgrid-bundle.json"), META_BYTES), (_member("../model.bin"), b"x")], "not a plain file name"),
    ([(_member("offgrid-bundle.json"), META_BYTES), (_member("model.bin", tarfile.SYMTYPE, linkname="/etc/passwd"),
                                                     b"")], "not a plain file"),
    ([(_member("offgrid-bundle.json"), META_BYTES), (_member("config.json", pax_headers={"comment": "x"}), b"{}")],
     "not a plain file"),
    ([(_member("offgrid-bundle.json"), META_BYTES), (_member("model.bin"), b"x")], "lacks"),
    ([(_member("offgrid-bundle.json"), b"{nope")], "not valid JSON"),
    ([(_member("offgrid-bundle.json"), json.dumps({"format": 2}).encode())], "format 2 is not supported"),
    ([(_member("offgrid-bundle.json"), json.dumps({"format": 1, **STT_META, "kind": "tts"}).encode())],
     "does not match engine"),
    ([(_member("offgrid-bundle.json"), META_BYTES)] + [(_member(f"f{i}"), b"x") for i in range(20)], "more than"),
])
def test_a_hostile_bundle_is_refused_naming_what_is_wrong(tmp_path, members, reason):
    path = tmp_path / "b"
    path.write_bytes(_tar(members))
    with pytest.raises(BundleError, match=re.escape(reason)):
        read_bundle_info(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_bundle_raises_only_bundle_error(tmp_path_factory, data):
    base = tmp_path_factory.mktemp("fuzz")
    good = bytearray(bundle_bytes(base))
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(good) - 1))
        good[at] = data.draw(st.integers(0, 255))
    cut = data.draw(st.one_of(st.none(), st.integers(0, len(good))))
    path = base / "bundle"
    path.write_bytes(bytes(good[:cut] if cut is not None else good))
    try:
        info = read_bundle_info(path)
    except BundleError:
        return
    assert all(offset + size <= path.stat().st_size for offset, size in info.members.values())


def test_a_stick_carries_a_speech_model_like_any_other(store, tmp_path):
    from offgridd.db import Database
    from offgridd.events import EventBus
    from offgridd.usb.importer import import_stick

    stick = tmp_path / "stick"
    (stick / "OFFGRID" / "models").mkdir(parents=True)
    data = bundle_bytes(tmp_path)
    (stick / "OFFGRID" / "models" / "whisper.bundle").write_bytes(data)
    (stick / "OFFGRID" / "manifest.json").write_text(json.dumps({"format": 1, "models": [{
        "name": "whisper-stick", "file": "OFFGRID/models/whisper.bundle", "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data), "quantization": "ctranslate2", "license": "MIT"}]}))
    db = Database(tmp_path / "offgridd.db")
    try:
        report = import_stick(stick, store=store, jobs=JobBoard(db, EventBus()))
    finally:
        db.close()
    assert report.imported == ["whisper-stick"], report.to_dict()
    assert store.get("whisper-stick").kind == "stt"


def test_a_speech_model_exported_to_a_stick_imports_on_another_box_with_its_kind(store, tmp_path):
    from offgridd.db import Database
    from offgridd.events import EventBus
    from offgridd.usb import ModelSource, import_stick, write_stick

    data = bundle_bytes(tmp_path)
    m = store.import_chunks([data], name="whisper-here", source="test")
    stick = tmp_path / "stick"
    stick.mkdir()
    written = write_stick(stick, [ModelSource(name=m.name, path=store.path_of(m), license="MIT", sha256=m.sha256)])
    assert written[0].file.endswith(".bundle") and written[0].quantization == "ctranslate2"
    other = ModelStore(tmp_path / "other")
    db = Database(tmp_path / "other.db")
    try:
        assert import_stick(stick, store=other, jobs=JobBoard(db, EventBus())).imported == ["whisper-here"]
    finally:
        db.close()
    assert other.get("whisper-here").kind == "stt" and other.get("whisper-here").sha256 == m.sha256


# --- admission: speech waits for a slot in the same queue as chat ----------------------------------------------------

class FakeSpeechToText:
    def transcribe(self, audio, **kwargs) -> Transcript:
        return Transcript(model="fake", text="hello", language="english", duration=len(audio) / 16000)


def wav_bytes(seconds: float = 0.5, rate: int = 16000) -> bytes:
    from offgridd.voice.audio import wav_header

    samples = (0.2 * np.sin(np.arange(int(seconds * rate)) / 5)).astype(np.float32)
    pcm = (samples * 32767).astype("<i2").tobytes()
    return wav_header(rate, len(pcm)) + pcm


def voice_service(store: ModelStore, admission: Admission, idle: asyncio.Event, **settings) -> VoiceService:
    service = VoiceService(VoiceSettings(**settings), store, admission.ticket, idle, wait_limit=1.0)
    service._loaded["whisper-tiny.en"] = FakeSpeechToText()
    return service


async def test_a_transcription_waits_for_a_free_slot_and_a_full_queue_answers_overloaded(store):
    admission, idle = Admission(1, 1, 30), asyncio.Event()
    idle.set()
    service = voice_service(store, admission, idle)
    async with admission.ticket():  # a chat holds the only slot
        waiting = asyncio.create_task(service.transcribe("whisper-1", wav_bytes()))
        for _ in range(200):  # the upload is decoded first (in the decoder child), then it queues
            await asyncio.sleep(0.05)
            if admission.waiting:
                break
        assert not waiting.done() and admission.waiting == 1
        with pytest.raises(Overloaded) as refused:  # the queue (depth 1) is full
            await service.transcribe("whisper-1", wav_bytes())
        assert refused.value.retry_after > 0
    assert (await asyncio.wait_for(waiting, 10)).text == "hello"
    await service.stop()


async def test_where_the_board_has_no_room_speech_waits_until_decoding_is_done(store):
    admission, idle = Admission(4, 4, 30), asyncio.Event()  # a chat is decoding: idle is clear
    service = voice_service(store, admission, idle, beside_decoding=False)
    waiting = asyncio.create_task(service.transcribe(None, wav_bytes()))
    for _ in range(200):  # decoded, holding a slot, waiting for the decoding chat to end
        await asyncio.sleep(0.05)
        if admission.active:
            break
    await asyncio.sleep(0.2)
    assert not waiting.done() and admission.active == 1
    idle.set()
    assert (await asyncio.wait_for(waiting, 10)).text == "hello"
    idle.clear()
    with pytest.raises(Overloaded, match="decoding"):  # waited past its limit (1 s here)
        await service.transcribe(None, wav_bytes())
    await service.stop()


async def test_an_upload_that_is_not_audio_or_too_long_is_refused_before_it_queues(store):
    admission, idle = Admission(1, 0, 30), asyncio.Event()
    service = voice_service(store, admission, idle, max_audio_seconds=1)
    with pytest.raises(VoiceError, match="not an audio file"):
        await service.transcribe(None, b"%PDF-1.4 not audio at all" * 40)
    with pytest.raises(VoiceError, match="longer than"):
        await service.transcribe(None, wav_bytes(3))
    await service.stop()


@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_a_damaged_or_hostile_upload_raises_only_audio_error(data):
    from offgridd.voice.audio import AudioError

    good = bytearray(wav_bytes(0.3))
    for _ in range(data.draw(st.integers(0, 12))):
        good[data.draw(st.integers(0, len(good) - 1))] = data.draw(st.integers(0, 255))
    blob = data.draw(st.one_of(st.just(bytes(good)), st.binary(max_size=2048),
                               st.just(bytes(good[:data.draw(st.integers(0, len(good)))]))))
    try:
        samples = decode(blob, 2)
    except AudioError:
        return
    assert samples.dtype == np.float32 and len(samples) <= 2 * 16000 + 16000


async def test_a_decoder_that_dies_on_an_upload_costs_that_request_a_400_and_the_next_one_works(store):
    import os
    import signal

    admission, idle = Admission(1, 1, 30), asyncio.Event()
    idle.set()
    service = voice_service(store, admission, idle)
    assert (await service.transcribe(None, wav_bytes())).text == "hello"  # the decoder child is up
    (pid,) = list(service._decoder._processes)
    os.kill(pid, signal.SIGSTOP)  # held, so the upload is still being decoded when it dies, on any machine
    long = asyncio.create_task(service.transcribe(None, wav_bytes(500)))
    await asyncio.sleep(0.3)
    os.kill(pid, signal.SIGKILL)  # as a crash in a demuxer would end it
    with pytest.raises(VoiceError, match="decoder failed") as refused:
        await long
    assert refused.value.param == "file"
    assert (await service.transcribe(None, wav_bytes())).text == "hello"
    await service.stop()


def test_an_upload_is_decoded_to_16khz_mono():
    assert abs(len(decode(wav_bytes(1.0, 22050), 10)) - 16000) < 50


# --- the real daemon, through the official openai client -------------------------------------------------------------

@pytest.fixture(scope="module")
def voice_daemon(model_state, tmp_path_factory):
    """Speech models loaded at start; one request at a time and no queue, so a busy box answers 503 at once."""
    base = tmp_path_factory.mktemp("voice")
    state = private_state(model_state, base / "state")
    with running_daemon(state, base / "daemon.log", env={"OFFGRID_VOICE_PRELOAD": "true", "OFFGRID_PARALLEL": "1",
                                                         "OFFGRID_QUEUE_DEPTH": "0"}) as daemon:
        yield daemon


@pytest.fixture
def client(voice_daemon):
    # no key is configured: send none (an empty Authorization header)
    return openai.OpenAI(base_url=f"{voice_daemon.url}/v1", api_key="unused", max_retries=0,
                         default_headers={"Authorization": ""})


@pytest.fixture(scope="module")
def spoken(voice_daemon) -> bytes:
    c = openai.OpenAI(base_url=f"{voice_daemon.url}/v1", api_key="unused", max_retries=0,
                      default_headers={"Authorization": ""})
    return c.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="wav").content


def test_models_lists_the_speech_models_with_their_kind(client):
    kinds = {m.id: m.model_extra.get("kind") for m in client.models.list().data}
    assert kinds == {"gemma3-270m": "llm", "whisper-tiny.en": "stt", "piper-joe-medium": "tts"}


def test_a_spoken_sentence_transcribes_back_to_its_words(client, spoken):
    assert spoken[:4] == b"RIFF" and spoken[8:12] == b"WAVE"
    text = client.audio.transcriptions.create(model="whisper-1", file=("sentence.wav", spoken)).text
    assert recovered(SENTENCE, text) >= 0.9, text


def test_the_models_own_names_work_as_openais_do(client, spoken):
    audio = client.audio.speech.create(model="piper-joe-medium", voice="joe", input="Good morning.",
                                       response_format="wav").content
    assert "morning" in client.audio.transcriptions.create(model="whisper-tiny.en", file=("a.wav", audio)).text.lower()


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is installed by .ci/setup")
def test_speech_from_another_synthesizer_is_understood(client, tmp_path):
    said = "Please turn on the lights in the kitchen."
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(tmp_path / "e.wav"), said], check=True)
    text = client.audio.transcriptions.create(model="whisper-1", file=open(tmp_path / "e.wav", "rb")).text
    assert recovered(said, text) >= 0.7, text


def test_verbose_json_has_segments_and_words_with_times(client, spoken):
    r = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken), response_format="verbose_json",
                                           timestamp_granularities=["word", "segment"])
    assert r.language == "english" and 3 < r.duration < 8
    assert r.segments and r.segments[0].id == 0 and r.segments[-1].end <= r.duration + 0.5
    assert [w.word.strip(".,").lower() for w in r.words][:3] == ["the", "quick", "brown"]
    assert all(w.start <= w.end for w in r.words)
    only_words = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken),
                                                    response_format="verbose_json", timestamp_granularities=["word"])
    assert only_words.words and only_words.segments is None


def test_text_srt_and_vtt_are_shaped_as_openais(client, spoken):
    text = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken), response_format="text")
    assert text.endswith("\n") and recovered(SENTENCE, text) >= 0.9
    srt = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken), response_format="srt")
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:0\d,\d{3}\n\S", srt), srt
    vtt = client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken), response_format="vtt")
    assert re.match(r"WEBVTT\n\n00:00:00\.\d{3} --> 00:00:0\d\.\d{3}\n\S", vtt), vtt


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav"])
def test_every_response_format_decodes_to_the_spoken_length(client, fmt):
    audio = client.audio.speech.create(model="tts-1", voice="nova", input="One, two, three.",
                                       response_format=fmt).content
    assert 0.8 < len(decode(audio, 60)) / 16000 < 4


def test_pcm_is_24khz_16bit_mono_and_speed_makes_it_shorter(client):
    normal = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm").content
    fast = client.audio.speech.create(model="tts-1", voice="alloy", input=SENTENCE, response_format="pcm",
                                      speed=2.0).content
    assert 3 < len(normal) / 2 / 24000 < 7
    assert len(fast) < 0.7 * len(normal)


def test_speech_streams_its_first_sentence_before_the_last_is_made(client):
    text = " ".join([f"This is sentence number {i} of a longer answer." for i in range(1, 9)])
    started = time.monotonic()
    with client.audio.speech.with_streaming_response.create(model="tts-1", voice="alloy", input=text,
                                                            response_format="wav") as r:
        chunks = []
        for chunk in r.iter_bytes():
            chunks.append((time.monotonic() - started, chunk))
    first_sound = next(t for t, c in chunks if len(c) > 44 or (c[:4] != b"RIFF"))
    whole = chunks[-1][0]
    assert len(chunks) > 2 and first_sound < 0.5 * whole, (first_sound, whole)


@pytest.mark.parametrize("call, status, param", [
    (dict(model="no-such-model"), 404, "model"),
    (dict(model="gemma3-270m"), 400, "model"),
    (dict(file=("notes.txt", b"this is not audio " * 50)), 400, "file"),
    (dict(response_format="docx"), 400, "response_format"),
    (dict(temperature=3), 400, "temperature"),
    (dict(timestamp_granularities=["word"]), 400, "timestamp_granularities"),
])
def test_a_bad_transcription_request_gets_an_openai_shaped_error(client, spoken, call, status, param):
    with pytest.raises(openai.APIStatusError) as e:
        client.audio.transcriptions.create(**{"model": "whisper-1", "file": ("s.wav", spoken), **call})
    assert e.value.status_code == status and e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error" and e.value.body["message"]


def test_health_shows_what_speech_served_and_how_fast(voice_daemon, client, spoken):
    client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken))
    voice = voice_daemon.health()[1]["services"]["voice"]
    assert voice["served"]["transcriptions"] >= 1 and voice["served"]["speech"] >= 1
    assert 0 < voice["real_time_factor"]["stt"] < 2 and 0 < voice["real_time_factor"]["tts"] < 2
    assert sorted(voice["loaded"]) == ["piper-joe-medium", "whisper-tiny.en"] and not voice["degraded"]


def test_a_transcription_without_a_file_or_form_is_refused(voice_daemon):
    status, _, body = http("POST", f"{voice_daemon.url}/v1/audio/transcriptions", {"model": "whisper-1"})
    assert status == 400 and json.loads(body)["error"]["param"] == "file"
    boundary = "xyz"
    form = f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--{boundary}--\r\n"
    status, _, body = http("POST", f"{voice_daemon.url}/v1/audio/transcriptions", form.encode(),
                           {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and "no audio" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("call, param, code", [
    (dict(voice="darth"), "voice", "invalid_voice"),
    (dict(input="word " * 1000), "input", "string_above_max_length"),
    (dict(input=""), "input", None),
    (dict(model="whisper-1"), "model", "model_not_supported"),
    (dict(response_format="ogg"), "response_format", None),
    (dict(speed=9), "speed", None),
])
def test_a_bad_speech_request_gets_an_openai_shaped_400(client, call, param, code):
    with pytest.raises(openai.BadRequestError) as e:
        client.audio.speech.create(**{"model": "tts-1", "voice": "alloy", "input": "Hello.", **call})
    assert e.value.body["param"] == param and e.value.body["code"] == code


def test_a_transcription_while_a_chat_holds_the_only_slot_gets_503_with_retry_after(voice_daemon, client, spoken):
    other = openai.OpenAI(base_url=f"{voice_daemon.url}/v1", api_key="unused", max_retries=0,
                         default_headers={"Authorization": ""})
    holding, done = threading.Event(), threading.Event()

    def talk():
        stream = other.completions.create(model="gemma3-270m", prompt="Count slowly: 1, 2, 3,", max_tokens=400,
                                         temperature=0, stream=True)
        for _ in stream:
            holding.set()
            if done.is_set():
                break
        with contextlib.suppress(Exception):
            stream.close()

    worker = threading.Thread(target=talk)
    worker.start()
    try:
        assert holding.wait(60)
        with pytest.raises(openai.APIStatusError) as e:
            client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken))
        assert e.value.status_code == 503 and int(e.value.response.headers["Retry-After"]) >= 1
    finally:
        done.set()
        worker.join(60)
    # the slot is free again: the same request goes through
    deadline = time.monotonic() + 30
    while True:
        try:
            assert client.audio.transcriptions.create(model="whisper-1", file=("s.wav", spoken)).text
            break
        except openai.APIStatusError as e:
            if e.status_code != 503 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_each_board_profile_says_whether_it_speaks_and_whether_beside_decoding():
    from offgridd.hardware.profiles import load_profiles, profiles_dir
    from offgridd.settings import load_settings

    profiles = {p.id: p for p in load_profiles(profiles_dir(None))}
    assert all("voice" in p.values and p.values["voice"] for p in profiles.values())
    zero = load_settings(env={}, base=profiles["pi-zero-2w"].settings_layer(), config=None)
    assert zero.voice.enabled is False
    pi4 = load_settings(env={}, base=profiles["pi4-2gb"].settings_layer())
    assert pi4.voice.enabled and not pi4.voice.beside_decoding and pi4.voice.stt_model == "whisper-tiny.en"
    assert load_settings(env={}, base=profiles["generic-x86_64"].settings_layer()).voice.beside_decoding


# --- the UI in Chromium, its microphone fed from a WAV ----------------------------------------------------------------

def chromium(playwright, *extra: str):
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.skip("Debian's chromium package is not installed (.ci/setup installs it)")
    return playwright.chromium.launch(executable_path=path, headless=True, args=[
        "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-extensions", *extra])


def test_the_ui_records_a_question_transcribes_it_sends_it_and_reads_the_answer_aloud(voice_daemon, spoken, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    import wave

    samples = decode(spoken, 60)  # the sentence, as a plain 16 kHz WAV file for Chromium's fake capture device
    with wave.open(str(tmp_path / "question.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.concatenate([samples, np.zeros(16000, np.float32)]) * 32767).astype("<i2").tobytes())
    with sync_api.sync_playwright() as p:
        browser = chromium(p, "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                           f"--use-file-for-fake-audio-capture={tmp_path / 'question.wav'}")
        try:
            page = browser.new_context().new_page()
            page.set_default_timeout(120_000)
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(voice_daemon.url + "/")
            page.wait_for_selector("#model option", state="attached")
            assert page.eval_on_selector_all("#model option", "os => os.map(o => o.value)") == ["gemma3-270m"]
            page.click("#mic")
            page.wait_for_selector('#mic[aria-pressed="true"]')
            page.wait_for_timeout(4500)
            page.click("#mic")
            page.wait_for_selector(".msg.user")
            asked = page.inner_text(".msg.user .body")
            assert recovered(SENTENCE, asked) >= 0.7, asked
            page.wait_for_selector(".msg.assistant .speak")  # the answer is complete
            page.click(".msg.assistant .speak")
            page.wait_for_function("() => document.querySelector('.msg.assistant .speak').textContent === 'Speak'")
            assert any(u.endswith("/v1/audio/speech") for u in requests)
            assert page.is_hidden("#banner") or not page.inner_text("#banner").strip()
        finally:
            browser.close()


def test_on_plain_http_from_another_host_the_microphone_button_says_why_it_cannot_listen(voice_daemon):
    sync_api = pytest.importorskip("playwright.sync_api")
    port = voice_daemon.url.rsplit(":", 1)[1]
    with sync_api.sync_playwright() as p:
        browser = chromium(p, "--host-resolver-rules=MAP offgrid-voice.local 127.0.0.1")
        try:
            page = browser.new_context().new_page()
            page.goto(f"http://offgrid-voice.local:{port}/")
            page.click("#mic")
            page.wait_for_selector("#banner:not([hidden])")
            assert "https" in page.inner_text("#banner") and "offgrid-voice.local" in page.inner_text("#banner")
        finally:
            browser.close()


# --- push to talk: the appliance with no screen ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def speech_store(tmp_path_factory) -> ModelStore:
    """A store with the default speech models, registered from their PyPI packages."""
    from offgridd.voice.defaults import BUILTINS, register

    s = ModelStore(tmp_path_factory.mktemp("speech") / "models")
    s.open()
    for model in BUILTINS:
        register(s, model)
    return s


def write_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((samples * 32767).astype("<i2").tobytes())
    return path


async def test_holding_the_button_records_releasing_it_answers_aloud(speech_store, spoken, tmp_path):
    """gpiozero's MockFactory for the button; a file-backed capture device and a file as the speaker (sox)."""
    from gpiozero.pins.mock import MockFactory

    from offgridd.voice.talk import PushToTalk

    if shutil.which("sox") is None:
        pytest.skip("sox is installed by .ci/setup")
    question = write_wav(tmp_path / "question.wav", decode(spoken, 60))
    reply = tmp_path / "reply.wav"
    admission, idle = Admission(1, 4, 30), asyncio.Event()
    idle.set()
    settings = VoiceSettings(button_pin=22, capture_command=f"sox -q {question} -t wav -",
                             playback_command=f"sox -q -t wav - {reply}")
    voice = VoiceService(settings, speech_store, admission.ticket, idle)
    asked = []

    async def answer(text: str) -> str:
        asked.append(text)
        return "The fox jumped over the dog."

    factory = MockFactory()
    talk = PushToTalk(settings, voice, answer, pin_factory=factory)
    await talk.start()
    pin = factory.pin(22)
    try:
        pin.drive_low()  # held
        for _ in range(100):
            if talk.state == "recording":
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)
        pin.drive_high()  # released
        for _ in range(600):
            await asyncio.sleep(0.1)
            if talk.state == "idle" and "said" in talk.last:
                break
        assert talk.error is None and recovered(SENTENCE, asked[0]) >= 0.8, (talk.describe(), asked)
        heard = await voice.transcribe(None, reply.read_bytes())
        assert recovered("The fox jumped over the dog.", heard.text) >= 0.8, heard.text
    finally:
        await talk.stop()
        await voice.stop()


async def test_without_gpio_push_to_talk_is_off_and_says_why_while_speech_still_works(speech_store, monkeypatch):
    monkeypatch.setenv("GPIOZERO_PIN_FACTORY", "nosuchfactory")
    admission, idle = Admission(1, 4, 30), asyncio.Event()
    voice = VoiceService(VoiceSettings(button_pin=22), speech_store, admission.ticket, idle, chat=lambda *a, **k: None)
    await voice.start()
    try:
        assert voice.talk is None
        assert [d["step"] for d in voice.describe()["degraded"]] == ["push-to-talk-off"]
    finally:
        await voice.stop()


async def test_a_spoken_question_is_answered_by_the_default_model_through_inference():
    from offgridd.inference import Done
    from offgridd.voice.talk import answer_with

    seen = {}

    class Generation:
        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            seen["closed"] = True

        async def __aiter__(self):
            for piece in ("Paris", " is", " the capital."):
                yield Token(piece)
            yield Done(3, 3, ["stop"])

    async def generate(model, *, messages, params):
        seen.update(model=model, messages=messages, params=params)
        return Generation()

    assert await answer_with(generate, "What is the capital of France?") == "Paris is the capital."
    assert seen["model"] is None and seen["messages"][0]["content"].startswith("What is") and seen["closed"]


def test_where_memory_may_not_be_writable_and_executable_speech_to_text_fails_its_self_test_saying_why(speech_store):
    """systemd's MemoryDenyWriteExecute=yes, as Linux's prctl(PR_SET_MDWE) imposes it on one process: CTranslate2's
    x86-64 build (oneDNN) cannot run there; it must fail at load with the reason, never mid-request or silently."""
    script = f"""
import ctypes, sys
if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
    print("no-mdwe"); sys.exit()
import numpy as np
from offgridd.store import ModelStore
from offgridd.voice.engines import SpeechToText
store = ModelStore({str(speech_store.root)!r})
try:
    stt = SpeechToText("whisper-tiny.en", store.path_of(store.get("whisper-tiny.en")), 2)
except RuntimeError as e:
    print("refused:", e)
else:
    print("ran:", repr(stt.transcribe(np.zeros(16000, np.float32), language=None, prompt=None, temperature=None,
                                      words=False).text))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    if out.stdout.startswith("no-mdwe"):
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("ran:") or "MemoryDenyWriteExecute" in out.stdout, out.stdout


def test_a_chat_naming_a_speech_model_is_a_400_and_no_speech_model_stands_in(client):
    with pytest.raises(openai.BadRequestError, match="speech"):
        client.chat.completions.create(model="piper-joe-medium", max_tokens=4,
                                       messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="speech"):
        client.embeddings.create(model="whisper-tiny.en", input="hi")
