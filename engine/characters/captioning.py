"""Auto-captioning and character suggestion through an OpenAI-compatible vision endpoint.

Any server that speaks `POST {base_url}/chat/completions` with image parts works: a local llava
served by Ollama (`http://127.0.0.1:11434/v1`), LM Studio, vLLM, or a hosted API. The image goes
as a PNG data URL, downscaled so its long side is at most MAX_IMAGE_SIDE; temperature is 0 so the
same image gets the same answer.

Errors: an endpoint that cannot be reached (refused, DNS, timeout, dropped connection) or that says
it is busy (HTTP 429/502/503/504) raises TransientError; a refused API key (401/403), any other HTTP
error and an answer without `choices[0].message.content` raise InputError. The API key is sent only
in the Authorization header: it is never logged nor shown in a repr or an error message.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from engine.errors import InputError, NotFoundError, TransientError

log = logging.getLogger(__name__)

MAX_IMAGE_SIDE = 768  # what llava-class models see anyway; keeps the request small
BODY_EXCERPT_CHARS = 300
BUSY_STATUSES = (429, 502, 503, 504)  # the server is up but cannot answer now: worth retrying

CAPTION_PROMPTS: dict[str, str] = {
    "tags": (
        "Describe this image as a comma-separated list of short booru-style tags: subject, hair, "
        "clothing, pose, expression, background, style. Answer with the tags only, on one line, "
        "without numbering or explanations."
    ),
    "sentence": (
        "Describe this image in one descriptive sentence: subject, appearance, pose, background "
        "and style. Answer with the sentence only."
    ),
}
CAPTION_SYSTEM = "You write training captions for images. You answer with the caption only."
CHARACTER_SYSTEM = (
    "You identify which known character an image shows. You answer with exactly one name from the "
    'list you are given, or with the word "none".'
)

# A leading label some models put before the answer ("Caption: ...", "Tags: ...").
_LABEL_RE = re.compile(r"^\s*(?:caption|tags|description|answer)\s*:\s*", re.IGNORECASE)
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)])\s+")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"


@dataclass(frozen=True)
class VisionConfig:
    """Where the vision model is served and how to ask it."""

    base_url: str  # e.g. "http://127.0.0.1:11434/v1"; the part before /chat/completions
    model: str  # e.g. "llava"
    api_key: str = field(default="", repr=False)  # sent as "Authorization: Bearer <key>" when set
    timeout_s: float = 60.0
    max_tokens: int = 200

    def __post_init__(self) -> None:
        parts = urlsplit(self.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(
                f"vision base_url {self.base_url!r} is not an http(s) URL; "
                "give one like 'http://127.0.0.1:11434/v1'"
            )
        if not self.model.strip():
            raise InputError("vision model is empty; give the model name the endpoint serves, e.g. 'llava'")
        if not self.timeout_s > 0:
            raise InputError(f"vision timeout_s={self.timeout_s!r} must be > 0 seconds")
        if self.max_tokens < 1:
            raise InputError(f"vision max_tokens={self.max_tokens!r} must be >= 1")

    @classmethod
    def from_settings(cls, base_url: str, model: str, api_key: str = "") -> VisionConfig | None:
        """The config for these settings, or None when no endpoint is set (captioning is off)."""
        if not base_url.strip():
            return None
        return cls(base_url=base_url.strip(), model=model.strip(), api_key=api_key.strip())

    @property
    def completions_url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"


def caption_image(config: VisionConfig, image_path: Path, trigger_word: str = "", style: str = "tags") -> str:
    """A one-line caption for the image: booru-like tags (style "tags") or one sentence ("sentence").

    With a trigger word the caption starts with "<trigger_word>, " and holds it nowhere else.
    """
    if style not in CAPTION_PROMPTS:
        raise InputError(f"caption style {style!r} is not one of {sorted(CAPTION_PROMPTS)}")
    image_url = _image_data_url(image_path)
    answer = _chat(config, CAPTION_SYSTEM, CAPTION_PROMPTS[style], image_url)
    caption = _clean_caption(answer, trigger_word.strip(), style)
    if not caption:
        raise InputError(
            f"vision model {config.model!r} returned an empty caption for {image_path} (answer: {answer!r})"
        )
    return caption


def suggest_character(
    config: VisionConfig, image_path: Path, characters: list[tuple[str, str]]
) -> str | None:
    """The name of the character among `characters` (name, short description) the image shows,
    as spelled in `characters`; None when the model answers "none" or a name not in the list."""
    names = [name.strip() for name, _ in characters]
    if not names:
        raise InputError("characters is empty; give at least one (name, description) to choose from")
    if not all(names):
        raise InputError(f"characters holds an empty name: {characters!r}")
    listing = "\n".join(
        f"- {name}: {description.strip()}" if description.strip() else f"- {name}"
        for name, (_, description) in zip(names, characters, strict=True)
    )
    prompt = (
        "Which of these characters does the image show?\n"
        f"{listing}\n"
        'Answer with exactly one name from the list, or "none" if none of them fits.'
    )
    answer = _chat(config, CHARACTER_SYSTEM, prompt, _image_data_url(image_path))
    return _match_name(answer, names)


# --- the request -------------------------------------------------------------------------------------


def _image_data_url(image_path: Path) -> str:
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(image_path)
    if not path.is_file():
        raise NotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened)
            image.load()
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {path} is not an image Pillow can read: {e}") from e
    if image.mode not in ("RGB", "RGBA"):
        image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
    if image.mode == "RGBA":  # transparent pixels would show as black to most models
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    if max(image.size) > MAX_IMAGE_SIDE:
        image = image.copy()
        image.thumbnail((MAX_IMAGE_SIDE, MAX_IMAGE_SIDE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _chat(config: VisionConfig, system: str, prompt: str, image_url: str) -> str:
    """POST one chat completion with a text and an image part; the answer's text."""
    import httpx

    url = config.completions_url
    body = {
        "model": config.model,
        "max_tokens": config.max_tokens,
        "temperature": 0,
        "messages": [
            {"role": "system", "content": system},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": prompt},
                    {"type": "image_url", "image_url": {"url": image_url}},
                ],
            },
        ],
    }
    headers = {"Accept": "application/json"}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    timeout = httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 10.0))
    # A proxy from the environment would swallow a local server (Ollama, LM Studio): go direct there.
    trust_env = not _is_loopback(url)
    log.debug("vision request to %s, model %s", url, config.model)
    try:
        with httpx.Client(timeout=timeout, trust_env=trust_env) as client:
            response = client.post(url, json=body, headers=headers)
    except httpx.TimeoutException as e:
        raise TransientError(
            f"vision endpoint {url} is not reachable: no answer within {config.timeout_s:g} s ({e!r})"
        ) from e
    except httpx.TransportError as e:
        raise TransientError(f"vision endpoint {url} is not reachable: {e}") from e
    return _answer_text(response, config)


def _answer_text(response: Any, config: VisionConfig) -> str:
    url = config.completions_url
    code = response.status_code
    if code in (401, 403):
        what = "was refused" if config.api_key else "is missing: the endpoint asks for one"
        raise InputError(
            f"vision endpoint {url} answered HTTP {code}: the API key {what}; "
            "check the vision API key in the settings"
        )
    if code >= 400:
        where = f"vision endpoint {url} answered HTTP {code}: {_excerpt(response.text, config)}"
        if code in BUSY_STATUSES:
            raise TransientError(f"{where}; try again later")
        raise InputError(where)
    try:
        payload = response.json()
    except ValueError as e:
        raise InputError(
            f"unexpected response from vision endpoint {url}: not JSON: {_excerpt(response.text, config)}"
        ) from e
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise InputError(
            f"unexpected response from vision endpoint {url}: no choices[0].message.content in "
            f"{_excerpt(response.text, config)}"
        ) from e
    if isinstance(content, list):  # some servers answer content as parts, like the request
        content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
    if not isinstance(content, str):
        raise InputError(
            f"unexpected response from vision endpoint {url}: message.content is "
            f"{type(content).__name__}, not text"
        )
    return content


def _excerpt(text: str, config: VisionConfig) -> str:
    text = " ".join(text.split())
    if config.api_key:  # a server that echoes the request must not put the key into an error
        text = text.replace(config.api_key, "***")
    if len(text) > BODY_EXCERPT_CHARS:
        text = text[:BODY_EXCERPT_CHARS] + "..."
    return repr(text) if text else "(empty body)"


def _is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --- the answer --------------------------------------------------------------------------------------


def _strip_quotes(text: str) -> str:
    text = text.strip()
    while len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
        text = text[1:-1].strip()
    return text


def _clean_caption(answer: str, trigger_word: str, style: str) -> str:
    text = answer.strip().replace("```", "")
    text = _strip_quotes(_LABEL_RE.sub("", _strip_quotes(text), count=1))
    lines = [_BULLET_RE.sub("", line).strip() for line in text.splitlines()]
    lines = [_strip_quotes(_LABEL_RE.sub("", line, count=1)) for line in lines if line]
    if style == "tags":
        tags = [tag.strip().strip(_QUOTES).strip() for line in lines for tag in line.split(",")]
        tags = [tag.rstrip(".").strip() for tag in tags]
        if trigger_word:
            tags = [_drop_word(tag, trigger_word).strip(" ,;:") for tag in tags]
        kept: list[str] = []
        for tag in tags:
            if tag and tag.lower() not in {k.lower() for k in kept}:
                kept.append(tag)
        caption = ", ".join(kept)
    else:
        caption = " ".join(lines)
        if trigger_word:
            caption = _drop_word(caption, trigger_word)
            caption = re.sub(r"\s+([,.;:!?])", r"\1", caption)
            caption = re.sub(r"([,;:])\s*(?=[,;:.])", "", caption).strip(" ,;:")
        caption = " ".join(caption.split())
    if trigger_word:
        return f"{trigger_word}, {caption}" if caption else trigger_word
    return caption


def _drop_word(text: str, word: str) -> str:
    """`text` without any whole-word occurrence of `word` (case-insensitive)."""
    pattern = re.compile(rf"(?<!\w){re.escape(word)}(?!\w)", re.IGNORECASE)
    return " ".join(pattern.sub(" ", text).split())


def _match_name(answer: str, names: list[str]) -> str | None:
    """The one name of `names` the answer gives; None for "none", no known name or several."""
    text = _strip_quotes(_LABEL_RE.sub("", answer.strip(), count=1)).strip(" .,;:!?*_\"'")
    for name in names:
        if text.lower() == name.lower():
            return name
    if text.lower() == "none":
        return None
    spans: dict[str, list[tuple[int, int]]] = {}
    for name in names:
        pattern = re.compile(rf"(?<!\w){re.escape(name)}(?!\w)", re.IGNORECASE)
        found = [m.span() for m in pattern.finditer(text)]
        if found:
            spans[name] = found
    # "Nova Prime" holds "Nova": a name found only inside a longer found name does not count.
    found_names = [
        name
        for name, name_spans in spans.items()
        if any(
            not any(
                other != name and len(other) > len(name) and o0 <= s0 and s1 <= o1
                for other, other_spans in spans.items()
                for o0, o1 in other_spans
            )
            for s0, s1 in name_spans
        )
    ]
    distinct = {name.lower(): name for name in found_names}
    if len(distinct) == 1:
        return next(iter(distinct.values()))
    return None
