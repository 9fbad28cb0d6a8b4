"""Text to speech: an offline espeak-ng voice, or any OpenAI-compatible speech server.

`speak(SpeechRequest(...), out)` writes a 16-bit mono WAV and returns a `SpeechResult` whose
duration is measured from the samples written.

espeak-ng comes from the `espeakng-loader` wheel (the library and its voice data), bound here with
ctypes to the synthesis API of `speak_lib.h`. Set `STUDIONOVA_ESPEAK=system` to use the system's
libespeak-ng and its data instead, when one is installed. espeak-ng keeps its state in globals and is
not thread-safe, so every call into it holds `_ESPEAK_LOCK`; it is loaded and initialised on first
use, never at import.

The HTTP backend posts `{"model", "input", "voice", "speed", "response_format": "wav"}` to
`{base_url}/v1/audio/speech` (OpenAI's speech API, which kokoro-fastapi, openedai-speech and
LocalAI also speak) and converts the WAV it answers to 16-bit mono.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import difflib
import io
import logging
import math
import os
import sys
import threading
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import urlsplit

from engine.artifacts import atomic_write
from engine.errors import InputError, StudioError, TransientError

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

SPEECH_BACKENDS = ("espeak", "http")
MAX_TEXT_CHARS = 5000
MIN_SPEED, MAX_SPEED = 0.5, 2.0
ESPEAK_ENV = "STUDIONOVA_ESPEAK"  # "bundled" (the default) or "system"
ESPEAK_SOURCES = ("bundled", "system")
HTTP_CONNECT_TIMEOUT_S = 10.0
HTTP_READ_TIMEOUT_S = 120.0  # a long text on a CPU-only server takes a while
SPEECH_PATH = "/v1/audio/speech"

# speak_lib.h (espeak-ng API revision 12)
_AUDIO_OUTPUT_SYNCHRONOUS = 2  # espeak_AUDIO_OUTPUT: like RETRIEVAL, but Synth returns when done
_INITIALIZE_DONT_EXIT = 0x8000  # return -1 instead of exit() when the data folder is missing
_POS_CHARACTER = 1
_CHARS_UTF8 = 1  # no espeakSSML / espeakPHONEMES: user text is spoken literally
_EE_OK = 0
_ESPEAK_RATE = 1  # espeak_PARAMETER espeakRATE, in words per minute
_RATE_NORMAL = 175  # espeakRATE_NORMAL; speed 0.5..2.0 stays inside espeakRATE_MINIMUM..MAXIMUM (80..450)
_SAMPLE_BYTES = 2


@dataclass
class SpeechRequest:
    text: str = field(metadata={"help": f"What to say: 1 to {MAX_TEXT_CHARS} characters."})
    voice: str = field(
        default="en",
        metadata={
            "help": "espeak: a voice name, identifier or language code from list_voices() "
            "('en', 'en-us', 'de', 'English (America)', 'en+f3'); http: the server's voice name."
        },
    )
    speed: float = field(
        default=1.0, metadata={"help": f"Speaking rate, {MIN_SPEED} to {MAX_SPEED}; 1 is normal."}
    )
    backend: Literal["espeak", "http"] = field(
        default="espeak",
        metadata={"help": "'espeak' (offline, built in) or 'http' (an OpenAI-compatible server)."},
    )
    base_url: str = field(
        default="",
        metadata={
            "help": "http backend: the server root, e.g. http://127.0.0.1:8880 (a trailing /v1 is fine)."
        },
    )
    model: str = field(default="tts-1", metadata={"help": "http backend: the server's model name."})
    api_key: str = field(default="", metadata={"help": "http backend: sent as a bearer token when set."})

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InputError(f"text must be a string, got {type(self.text).__name__}")
        n = len(self.text.strip())
        if not 1 <= n <= MAX_TEXT_CHARS:
            raise InputError(f"text has {n} characters after trimming spaces; allowed: 1 to {MAX_TEXT_CHARS}")
        if "\x00" in self.text:
            raise InputError("text contains a NUL character (\\x00); remove it")
        if self.backend not in SPEECH_BACKENDS:
            raise InputError(f"backend {self.backend!r} is unknown; allowed: {', '.join(SPEECH_BACKENDS)}")
        if (
            isinstance(self.speed, bool)
            or not isinstance(self.speed, int | float)
            or not math.isfinite(self.speed)
            or not MIN_SPEED <= self.speed <= MAX_SPEED
        ):
            raise InputError(f"speed {self.speed!r} is out of range; allowed: {MIN_SPEED} to {MAX_SPEED}")
        _check_name("voice", self.voice)
        if self.backend == "http":
            parts = urlsplit(self.base_url.strip()) if isinstance(self.base_url, str) else None
            if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
                raise InputError(
                    f"base_url {self.base_url!r} is not an http(s) URL; the http backend needs the "
                    "server's address, e.g. http://127.0.0.1:8880"
                )
            _check_name("model", self.model)
            if not isinstance(self.api_key, str) or not self.api_key.isprintable():
                raise InputError("api_key must be printable text (no line breaks or control characters)")


@dataclass
class SpeechResult:
    path: Path
    duration: float  # seconds, from the number of samples written
    sample_rate: int
    voice: str
    backend: str


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice: `name` or `identifier` (or one of `languages`) selects it."""

    name: str
    languages: tuple[str, ...]  # most preferred first, e.g. ("en-us", "en")
    identifier: str  # its file under espeak-ng-data/voices, e.g. "gmw/en-US"


def speak(req: SpeechRequest, out: Path) -> SpeechResult:
    """Say `req.text` into the WAV file `out` (16-bit mono; written atomically)."""
    out = Path(out)
    if out.suffix.lower() != ".wav":
        raise InputError(f"out {str(out)!r} must be a .wav file path")
    text = req.text.strip()
    if req.backend == "espeak":
        pcm, sample_rate = _speak_espeak(text, req.voice.strip(), req.speed)
    else:
        pcm, sample_rate = _speak_http(req, text)
    with atomic_write(out) as f, wave.open(f, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(_SAMPLE_BYTES)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    duration = len(pcm) // _SAMPLE_BYTES / sample_rate
    return SpeechResult(out, duration, sample_rate, req.voice.strip(), req.backend)


def list_voices() -> list[Voice]:
    """The espeak-ng voices (names, languages, identifiers), as espeak_ListVoices lists them."""
    with _ESPEAK_LOCK:
        return list(_espeak().voices())


def _check_name(label: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{label} must not be empty")
    if len(value) > 200 or not value.isprintable():
        raise InputError(f"{label} {value[:40]!r} must be printable text of at most 200 characters")


# ---- espeak-ng -----------------------------------------------------------------------------------


class _EspeakVoice(ctypes.Structure):
    # espeak_VOICE. `languages` is a void pointer: in ListVoices' answer it is a run of
    # (priority byte, language, NUL) ending with an extra NUL, which c_char_p would cut short.
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); the events are not used
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)

_ESPEAK_LOCK = threading.Lock()  # espeak-ng keeps its state in process globals
_ESPEAK: _Espeak | None = None  # loaded and initialised on first use, under the lock


class _Espeak:
    """The loaded library, initialised in synchronous retrieval mode. Use only under _ESPEAK_LOCK."""

    def __init__(self, lib: ctypes.CDLL, data_path: str | None, label: str) -> None:
        self.lib = lib
        self.label = label
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_Initialize.restype = ctypes.c_int
        lib.espeak_SetSynthCallback.argtypes = [_SYNTH_CALLBACK]
        lib.espeak_SetSynthCallback.restype = None
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetVoiceByName.restype = ctypes.c_int
        lib.espeak_SetVoiceByProperties.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_SetVoiceByProperties.restype = ctypes.c_int
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetParameter.restype = ctypes.c_int
        lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,  # text
            ctypes.c_size_t,  # size
            ctypes.c_uint,  # position
            ctypes.c_int,  # position_type
            ctypes.c_uint,  # end_position
            ctypes.c_uint,  # flags
            ctypes.POINTER(ctypes.c_uint),  # unique_identifier
            ctypes.c_void_p,  # user_data
        ]
        lib.espeak_Synth.restype = ctypes.c_int
        lib.espeak_Synchronize.argtypes = []
        lib.espeak_Synchronize.restype = ctypes.c_int
        lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_EspeakVoice)]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))

        path = data_path.encode() if data_path else None
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, path, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise StudioError(
                f"espeak-ng ({label}) could not start: no voice data at {data_path or 'its default folder'}; "
                f"reinstall espeakng-loader, or set {ESPEAK_ENV} to one of {', '.join(ESPEAK_SOURCES)}"
            )
        self.sample_rate = rate
        self._chunks: list[bytes] = []
        self._voices: tuple[Voice, ...] | None = None
        # kept on the instance: ctypes frees a callback whose Python object is collected
        self._callback = _SYNTH_CALLBACK(self._on_samples)
        lib.espeak_SetSynthCallback(self._callback)

    def _on_samples(self, wav, numsamples: int, _events) -> int:
        if wav and numsamples > 0:
            self._chunks.append(ctypes.string_at(wav, numsamples * _SAMPLE_BYTES))
        return 0  # 0 = continue synthesis

    def voices(self) -> tuple[Voice, ...]:
        if self._voices is None:
            found = []
            table = self.lib.espeak_ListVoices(None)
            i = 0
            while table[i]:
                v = table[i].contents
                found.append(
                    Voice(
                        name=(v.name or b"").decode("utf-8", "replace"),
                        languages=_language_list(v.languages),
                        identifier=(v.identifier or b"").decode("utf-8", "replace"),
                    )
                )
                i += 1
            self._voices = tuple(found)
        return self._voices

    def select_voice(self, voice: str) -> None:
        if self.lib.espeak_SetVoiceByName(voice.encode()) == _EE_OK:
            return
        # SetVoiceByName matches names and identifiers; a listed language code ("fr-fr") is
        # selected by properties, which picks that language's preferred voice.
        wanted = voice.lower()
        if any(wanted in v.languages for v in self.voices()):
            lang = ctypes.create_string_buffer(wanted.encode())
            spec = _EspeakVoice(languages=ctypes.cast(lang, ctypes.c_void_p))
            if self.lib.espeak_SetVoiceByProperties(ctypes.byref(spec)) == _EE_OK:
                return
        raise InputError(f"voice {voice!r} is not an espeak-ng voice; {_voice_hint(voice, self.voices())}")

    def synthesize(self, text: str, speed: float) -> bytes:
        rate = round(_RATE_NORMAL * speed)
        if self.lib.espeak_SetParameter(_ESPEAK_RATE, rate, 0) != _EE_OK:
            raise StudioError(f"espeak-ng refused the rate {rate} words per minute")
        data = text.encode("utf-8")
        self._chunks = []
        try:
            rc = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if rc != _EE_OK:
                raise StudioError(f"espeak-ng could not synthesize the text (espeak_Synth returned {rc})")
            self.lib.espeak_Synchronize()
            pcm = b"".join(self._chunks)
        finally:
            self._chunks = []
        if sys.byteorder == "big":  # WAV is little-endian; espeak hands native shorts
            import array

            samples = array.array("h", pcm)
            samples.byteswap()
            pcm = samples.tobytes()
        return pcm


def _language_list(ptr: int | None) -> tuple[str, ...]:
    """espeak_VOICE.languages in ListVoices' answer: (priority byte, language, NUL)*, NUL."""
    langs = []
    while ptr:
        if ctypes.string_at(ptr, 1) == b"\x00":
            break
        lang = ctypes.string_at(ptr + 1)  # up to the NUL
        langs.append(lang.decode("utf-8", "replace"))
        ptr += 1 + len(lang) + 1
    return tuple(langs)


def _voice_hint(voice: str, voices: tuple[Voice, ...]) -> str:
    by_lower = {c.lower(): c for v in voices for c in (v.name, *v.languages)}
    close = [by_lower[c] for c in difflib.get_close_matches(voice.lower(), sorted(by_lower), n=4, cutoff=0.5)]
    common = [c for c in ("en", "en-us", "en-gb", "de", "fr", "es") if c in by_lower and c not in close]
    examples = (close + common)[:6]
    return f"for example {', '.join(repr(c) for c in examples)} (list_voices() has all {len(voices)})"


def _espeak() -> _Espeak:
    """The initialised espeak-ng; call with _ESPEAK_LOCK held."""
    global _ESPEAK
    if _ESPEAK is None:
        _ESPEAK = _Espeak(*_load_espeak())
    return _ESPEAK


def _load_espeak() -> tuple[ctypes.CDLL, str | None, str]:
    """(library, data folder or None for the library's default, label) per STUDIONOVA_ESPEAK."""
    source = os.environ.get(ESPEAK_ENV, "").strip().lower() or "bundled"
    if source not in ESPEAK_SOURCES:
        raise InputError(f"{ESPEAK_ENV}={source!r} is unknown; allowed: {', '.join(ESPEAK_SOURCES)}")
    if source == "system":
        found = ctypes.util.find_library("espeak-ng")
        if found:
            return ctypes.CDLL(found), None, f"system {found}"
        log.warning("%s=system but no system libespeak-ng was found; using the bundled one", ESPEAK_ENV)
    import espeakng_loader

    lib_path = espeakng_loader.get_library_path()
    return ctypes.CDLL(lib_path), espeakng_loader.get_data_path(), f"bundled {lib_path}"


def _speak_espeak(text: str, voice: str, speed: float) -> tuple[bytes, int]:
    with _ESPEAK_LOCK:
        engine = _espeak()
        engine.select_voice(voice)
        pcm = engine.synthesize(text, speed)
        sample_rate = engine.sample_rate
    if not pcm:
        raise InputError(
            f"text {text[:40]!r} gave no audio with espeak-ng voice {voice!r}; give words to say"
        )
    return pcm, sample_rate


# ---- OpenAI-compatible HTTP server ---------------------------------------------------------------


def _speech_url(base_url: str) -> str:
    base = base_url.strip().rstrip("/")
    if base.endswith("/v1"):  # OpenAI clients take base URLs that end in /v1
        base = base[: -len("/v1")]
    return base + SPEECH_PATH


def _speak_http(req: SpeechRequest, text: str) -> tuple[bytes, int]:
    import httpx

    url = _speech_url(req.base_url)
    payload = {
        "model": req.model.strip(),
        "input": text,
        "voice": req.voice.strip(),
        "speed": req.speed,
        "response_format": "wav",
    }
    headers = {"Authorization": f"Bearer {req.api_key}"} if req.api_key else {}
    timeout = httpx.Timeout(HTTP_READ_TIMEOUT_S, connect=HTTP_CONNECT_TIMEOUT_S)
    try:
        response = httpx.post(url, json=payload, headers=headers, timeout=timeout)
    except httpx.TimeoutException as e:
        raise TransientError(f"speech server {url} did not answer in time ({type(e).__name__})") from e
    except httpx.TransportError as e:
        raise TransientError(f"speech server {url} could not be reached: {e}") from e
    _raise_for_status(response, url)
    body = response.content
    if body[:4] != b"RIFF" or body[8:12] != b"WAVE":
        kind = response.headers.get("content-type", "no content type")
        raise InputError(
            f"speech server {url} answered HTTP {response.status_code} with {kind} ({len(body)} bytes), "
            "not a WAV file; use a server that supports response_format 'wav'"
        )
    return _wav_to_mono16(body, url)


def _raise_for_status(response: httpx.Response, url: str) -> None:
    code = response.status_code
    if code < 400:
        return
    where = f"speech server {url} answered HTTP {code}: {_error_detail(response)}"
    if code in (408, 429) or code >= 500:
        raise TransientError(where)
    if code in (401, 403):
        raise InputError(f"{where} (check api_key)")
    raise InputError(f"{where} (check model, voice and base_url)")


def _error_detail(response: httpx.Response) -> str:
    """The server's own message: OpenAI's {"error": {"message"}}, FastAPI's {"detail"}, or text."""
    try:
        data = response.json()
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        detail = error.get("message") if isinstance(error, dict) else error or data.get("detail")
        if detail:
            return str(detail)[:300]
    text = response.text.strip()
    return text[:300] if text else response.reason_phrase or "no message"


def _wav_to_mono16(body: bytes, url: str) -> tuple[bytes, int]:
    """16-bit little-endian mono samples and the sample rate of a PCM WAV (8/16/24/32-bit, any channels)."""
    import numpy as np

    try:
        with wave.open(io.BytesIO(body)) as w:
            channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
            frames = w.readframes(w.getnframes())  # a streamed WAV may claim more frames than it holds
    except (wave.Error, EOFError) as e:
        raise InputError(
            f"speech server {url} sent a WAV this reader cannot decode ({e}); it must be PCM"
        ) from e
    if rate <= 0 or channels < 1 or width not in (1, 2, 3, 4):
        raise InputError(
            f"speech server {url} sent a WAV with {channels} channels, {width}-byte samples at {rate} Hz; "
            "allowed: 8, 16, 24 or 32-bit PCM"
        )
    frames = frames[: len(frames) // (width * channels) * width * channels]
    if width == 1:  # unsigned 8-bit
        samples = (np.frombuffer(frames, np.uint8).astype(np.int16) - 128) << 8
    elif width == 2:
        samples = np.frombuffer(frames, "<i2")
    elif width == 3:  # the top two bytes of each little-endian 24-bit sample
        samples = np.frombuffer(frames, np.uint8).reshape(-1, 3)[:, 1:].copy().view("<i2").ravel()
    else:
        samples = (np.frombuffer(frames, "<i4") >> 16).astype(np.int16)
    if channels > 1:
        samples = np.round(samples.reshape(-1, channels).mean(axis=1)).astype(np.int16)
    if not samples.size:
        raise InputError(f"speech server {url} sent a WAV with no samples")
    return samples.astype("<i2").tobytes(), rate
