"""engine.media.tts: the bundled espeak-ng voice for real, and the HTTP backend against a local
server that speaks OpenAI's speech protocol."""

from __future__ import annotations

import io
import json
import math
import re
import socket
import struct
import threading
import wave
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from engine.errors import InputError, TransientError
from engine.media.tts import SpeechRequest, SpeechResult, list_voices, speak

ONE_SENTENCE = "The quick brown fox jumps over the lazy dog."
THREE_SENTENCES = (
    "The quick brown fox jumps over the lazy dog. "
    "A second sentence makes the recording longer. "
    "And a third one makes it longer still."
)


def read_wav(path: Path) -> tuple[list[int], int]:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth()) == (1, 2)
        frames = w.readframes(w.getnframes())
        return list(struct.unpack(f"<{len(frames) // 2}h", frames)), w.getframerate()


def rms(samples: list[int]) -> float:
    return math.sqrt(sum(s * s for s in samples) / len(samples))


def test_espeak_speaks_audible_audio_that_grows_with_the_text(tmp_path):
    short = speak(SpeechRequest(ONE_SENTENCE), tmp_path / "one.wav")
    long = speak(SpeechRequest(THREE_SENTENCES), tmp_path / "three.wav")

    assert isinstance(short, SpeechResult)
    assert (short.backend, short.voice, short.path) == ("espeak", "en", tmp_path / "one.wav")
    samples, rate = read_wav(short.path)
    assert rate == short.sample_rate > 8000
    assert short.duration == pytest.approx(len(samples) / rate)
    assert 1.0 < short.duration < 10.0
    assert rms(samples) > 500  # speech, not silence
    assert long.duration > 2 * short.duration
    assert not list(tmp_path.glob(".tmp-*"))


def test_espeak_speed_changes_the_duration(tmp_path):
    durations = [
        speak(SpeechRequest(ONE_SENTENCE, speed=speed), tmp_path / f"{speed}.wav").duration
        for speed in (0.5, 1.0, 2.0)
    ]
    assert durations[0] > 1.5 * durations[1] > 1.5 * 1.5 * durations[2]


def test_unknown_espeak_voice_is_a_clear_error(tmp_path):
    with pytest.raises(InputError, match=r"voice 'klingon-xx' is not an espeak-ng voice; for example .*'en'"):
        speak(SpeechRequest("Hello", voice="klingon-xx"), tmp_path / "x.wav")
    assert not list(tmp_path.iterdir())


def test_list_voices_has_english_and_language_codes_select_voices(tmp_path):
    voices = list_voices()
    english = [v for v in voices if "en" in v.languages]
    assert english and any(v.name.startswith("English") for v in english)
    assert any("en-us" in v.languages for v in voices)
    # a listed language code that is no voice's name is selected by language
    result = speak(SpeechRequest("Bonjour tout le monde.", voice="fr-fr"), tmp_path / "fr.wav")
    assert result.duration > 0.5


def test_concurrent_espeak_calls_do_not_mix_their_audio(tmp_path):
    alone = speak(SpeechRequest(ONE_SENTENCE), tmp_path / "alone.wav").duration
    results = {}

    def run(i: int) -> None:
        results[i] = speak(SpeechRequest(ONE_SENTENCE), tmp_path / f"{i}.wav").duration

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # espeak-ng's output varies by a few milliseconds between calls; mixed calls would be far off
    assert results == {i: pytest.approx(alone, rel=0.05) for i in range(3)}


def test_espeak_source_comes_from_the_environment(monkeypatch):
    import ctypes.util

    from engine.media import tts

    monkeypatch.setenv(tts.ESPEAK_ENV, "festival")
    with pytest.raises(
        InputError, match=r"STUDIONOVA_ESPEAK='festival' is unknown; allowed: bundled, system"
    ):
        tts._load_espeak()
    # "system" without a system library falls back to the wheel's copy and its data folder
    monkeypatch.setenv(tts.ESPEAK_ENV, "system")
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    _lib, data_path, label = tts._load_espeak()
    assert label.startswith("bundled") and Path(data_path, "voices").is_dir()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"text": ""}, r"0 characters .* allowed: 1 to 5000"),
        ({"text": "   \n"}, r"0 characters .* allowed: 1 to 5000"),
        ({"text": "a" * 5001}, r"5001 characters .* allowed: 1 to 5000"),
        ({"text": "hi", "speed": 3.0}, r"speed 3.0 .* allowed: 0.5 to 2.0"),
        ({"text": "hi", "backend": "festival"}, r"backend 'festival' .* allowed: espeak, http"),
        ({"text": "hi", "backend": "http"}, r"base_url '' is not an http\(s\) URL"),
        ({"text": "hi", "backend": "http", "base_url": "ftp://host"}, r"base_url 'ftp://host'"),
        ({"text": "hi", "voice": " "}, r"voice must not be empty"),
    ],
)
def test_bad_requests_are_refused(fields, message):
    with pytest.raises(InputError, match=message):
        SpeechRequest(**fields)


def test_out_must_be_a_wav_path(tmp_path):
    with pytest.raises(InputError, match=r"\.wav"):
        speak(SpeechRequest("hi"), tmp_path / "x.mp3")


# ---- HTTP backend ---------------------------------------------------------------------------------


def stereo_wav(seconds: float = 0.5, rate: int = 24000) -> bytes:
    """A 440 Hz tone, 16-bit stereo: the backend must hand back mono."""
    n = int(seconds * rate)
    tone = [int(8000 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(n)]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(struct.pack(f"<{2 * n}h", *(s for t in tone for s in (t, t))))
    return buf.getvalue()


class SpeechServer:
    """An OpenAI-style /v1/audio/speech endpoint on 127.0.0.1 that records what it was sent."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.status, self.content_type, self.body = 200, "audio/wav", stereo_wav()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                server.requests.append(
                    {
                        "path": self.path,
                        "authorization": self.headers.get("Authorization"),
                        "json": json.loads(self.rfile.read(length)),
                    }
                )
                self.send_response(server.status)
                self.send_header("Content-Type", server.content_type)
                self.send_header("Content-Length", str(len(server.body)))
                self.end_headers()
                self.wfile.write(server.body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def request(self, **fields) -> SpeechRequest:
        return SpeechRequest(backend="http", base_url=self.url, **fields)


@pytest.fixture
def speech_server():
    server = SpeechServer()
    server.thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


def test_http_backend_posts_openai_json_and_writes_mono_wav(speech_server, tmp_path):
    req = speech_server.request(
        text="  Hello from the server.  ", voice="alloy", speed=1.25, api_key="sk-test"
    )
    result = speak(req, tmp_path / "http.wav")

    assert speech_server.requests == [
        {
            "path": "/v1/audio/speech",
            "authorization": "Bearer sk-test",
            "json": {
                "model": "tts-1",
                "input": "Hello from the server.",
                "voice": "alloy",
                "speed": 1.25,
                "response_format": "wav",
            },
        }
    ]
    assert (result.backend, result.voice, result.sample_rate) == ("http", "alloy", 24000)
    assert result.duration == pytest.approx(0.5)
    samples, rate = read_wav(result.path)
    assert rate == 24000 and len(samples) == 12000
    assert rms(samples) == pytest.approx(8000 / math.sqrt(2), rel=0.02)


def test_http_backend_accepts_a_base_url_ending_in_v1_and_no_key(speech_server, tmp_path):
    speak(SpeechRequest("Hi", backend="http", base_url=speech_server.url + "/v1/"), tmp_path / "a.wav")
    assert speech_server.requests[0]["path"] == "/v1/audio/speech"
    assert speech_server.requests[0]["authorization"] is None


def test_http_server_error_is_transient_and_names_server_and_status(speech_server, tmp_path):
    speech_server.status, speech_server.content_type = 500, "application/json"
    speech_server.body = json.dumps({"error": {"message": "model exploded"}}).encode()
    with pytest.raises(
        TransientError,
        match=re.escape(f"{speech_server.url}/v1/audio/speech answered HTTP 500: model exploded"),
    ):
        speak(speech_server.request(text="Hi"), tmp_path / "x.wav")
    assert not (tmp_path / "x.wav").exists()


def test_http_client_error_and_non_wav_answers_are_input_errors(speech_server, tmp_path):
    speech_server.status, speech_server.content_type = 400, "application/json"
    speech_server.body = json.dumps({"detail": "voice 'en' not found"}).encode()
    with pytest.raises(InputError, match=r"answered HTTP 400: voice 'en' not found"):
        speak(speech_server.request(text="Hi"), tmp_path / "x.wav")

    speech_server.status, speech_server.content_type, speech_server.body = 200, "audio/mpeg", b"ID3\x04fake"
    with pytest.raises(InputError, match=r"answered HTTP 200 with audio/mpeg \(8 bytes\), not a WAV file"):
        speak(speech_server.request(text="Hi"), tmp_path / "x.wav")


def test_refused_connection_is_transient(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago and has no listener now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(
        TransientError, match=re.escape(f"speech server {url}/v1/audio/speech could not be reached")
    ):
        speak(SpeechRequest("Hi", backend="http", base_url=url), tmp_path / "x.wav")
