"""Captioning and character suggestion against a local stub of an OpenAI-compatible vision endpoint."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import pytest
from PIL import Image

from engine.characters.captioning import MAX_IMAGE_SIDE, VisionConfig, caption_image, suggest_character
from engine.errors import InputError, TransientError
from tests.vision_stub import VisionStub, decode_data_url, request_parts

CHARACTERS = [("Nova", "silver hair, blue jacket"), ("Kai", "red scarf, goggles")]


@pytest.fixture
def stub():
    with VisionStub(api_key="k") as running:
        yield running


@pytest.fixture
def config(stub: VisionStub) -> VisionConfig:
    return VisionConfig(base_url=stub.base_url, model="llava", api_key="k", max_tokens=123)


def square(tmp_path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (64, 64)) -> Path:
    path = tmp_path / f"square_{colour[0]}_{colour[1]}_{colour[2]}_{size[0]}x{size[1]}.png"
    Image.new("RGB", size, colour).save(path)
    return path


def test_caption_of_a_red_image_starts_with_the_trigger_word(stub, config, tmp_path):
    caption = caption_image(config, square(tmp_path, (220, 30, 30)), trigger_word="trigger")
    assert caption == "trigger, a red square, simple background"

    body = stub.requests[-1]
    assert body["model"] == "llava"
    assert body["max_tokens"] == 123
    assert body["temperature"] == 0
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    text, images = request_parts(body)
    assert "comma-separated" in text
    assert len(images) == 1 and images[0].startswith("data:image/png;base64,")
    with Image.open(io.BytesIO(decode_data_url(images[0]))) as sent:
        assert sent.format == "PNG"
        assert sent.size == (64, 64)
    assert stub.headers[-1]["authorization"] == "Bearer k"


def test_caption_depends_on_the_image(stub, config, tmp_path):
    assert "blue" in caption_image(config, square(tmp_path, (10, 20, 230)))
    assert "red" in caption_image(config, square(tmp_path, (230, 20, 10)))


def test_large_images_are_downscaled_to_768_on_the_long_side(stub, config, tmp_path):
    caption_image(config, square(tmp_path, (200, 0, 0), size=(1600, 900)))
    _, images = request_parts(stub.requests[-1])
    with Image.open(io.BytesIO(decode_data_url(images[0]))) as sent:
        assert sent.format == "PNG"
        assert max(sent.size) == MAX_IMAGE_SIDE
        assert sent.size == (768, 432)


def test_the_trigger_word_is_not_repeated_and_the_answer_is_cleaned(stub, config, tmp_path):
    stub.caption_format = 'Caption: "Trigger, a {colour} square,\ntrigger, simple background."'
    caption = caption_image(config, square(tmp_path, (220, 30, 30)), trigger_word="trigger")
    assert caption == "trigger, a red square, simple background"
    assert "\n" not in caption and caption.lower().count("trigger") == 1


def test_sentence_style_gives_one_clean_line(stub, config, tmp_path):
    stub.caption_format = '"A {colour} square drawn by trigger\non a plain background."'
    caption = caption_image(config, square(tmp_path, (0, 0, 200)), trigger_word="trigger", style="sentence")
    assert caption == "trigger, A blue square drawn by on a plain background."
    assert "describe this image in one descriptive sentence" in request_parts(stub.requests[-1])[0].lower()


def test_an_unknown_style_is_refused(config, tmp_path):
    with pytest.raises(InputError, match="poem"):
        caption_image(config, square(tmp_path, (1, 2, 3)), style="poem")


def test_a_wrong_api_key_is_an_input_error_about_the_key(stub, tmp_path):
    wrong = VisionConfig(base_url=stub.base_url, model="llava", api_key="not-the-key")
    with pytest.raises(InputError, match="API key") as raised:
        caption_image(wrong, square(tmp_path, (200, 0, 0)))
    assert "not-the-key" not in str(raised.value)
    assert stub.headers[-1]["authorization"] == "Bearer not-the-key"
    keyless = VisionConfig(base_url=stub.base_url, model="llava")
    with pytest.raises(InputError, match="API key"):
        caption_image(keyless, square(tmp_path, (200, 0, 0)))
    assert "authorization" not in stub.headers[-1]


def test_an_unreachable_endpoint_is_transient_and_names_the_url(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = VisionConfig(base_url=f"http://127.0.0.1:{port}/v1", model="llava", timeout_s=5)
    with pytest.raises(
        TransientError, match=rf"vision endpoint http://127.0.0.1:{port}/v1\S* is not reachable"
    ):
        caption_image(config, square(tmp_path, (200, 0, 0)))


def test_a_slow_endpoint_times_out_as_transient(stub, tmp_path):
    stub.delay_s = 1.0
    config = VisionConfig(base_url=stub.base_url, model="llava", api_key="k", timeout_s=0.2)
    with pytest.raises(TransientError, match="not reachable"):
        caption_image(config, square(tmp_path, (200, 0, 0)))


def test_http_500_is_an_input_error_with_status_and_body(stub, config, tmp_path):
    stub.mode = "http_error"
    with pytest.raises(InputError, match=r"HTTP 500.*model runner crashed"):
        caption_image(config, square(tmp_path, (200, 0, 0)))


def test_a_busy_endpoint_is_transient(stub, config, tmp_path):
    stub.mode, stub.error_status = "http_error", 503
    with pytest.raises(TransientError, match="HTTP 503"):
        caption_image(config, square(tmp_path, (200, 0, 0)))


@pytest.mark.parametrize("mode", ["not_json", "no_content"])
def test_a_malformed_answer_is_an_unexpected_response(stub, config, tmp_path, mode):
    stub.mode = mode
    with pytest.raises(InputError, match="unexpected response"):
        caption_image(config, square(tmp_path, (200, 0, 0)))


def test_suggest_character_matches_the_answer_to_a_name(stub, config, tmp_path):
    image = square(tmp_path, (200, 200, 200))
    stub.character_answer = "Nova."
    assert suggest_character(config, image, CHARACTERS) == "Nova"
    assert stub.listed_names[-1] == ["Nova", "Kai"]
    text, images = request_parts(stub.requests[-1])
    assert "silver hair, blue jacket" in text and '"none"' in text
    assert images[0].startswith("data:image/png;base64,")

    stub.character_answer = "The image shows kai, I think."
    assert suggest_character(config, image, CHARACTERS) == "Kai"


@pytest.mark.parametrize("answer", ["none", "None.", "Zed", "Nova or Kai"])
def test_suggest_character_gives_none_without_exactly_one_known_name(stub, config, tmp_path, answer):
    stub.character_answer = answer
    assert suggest_character(config, square(tmp_path, (200, 200, 200)), CHARACTERS) is None


def test_a_longer_name_wins_over_the_name_it_contains(stub, config, tmp_path):
    stub.character_answer = "It is Nova Prime!"
    characters = [*CHARACTERS, ("Nova Prime", "armour")]
    assert suggest_character(config, square(tmp_path, (200, 200, 200)), characters) == "Nova Prime"


def test_config_validation_and_settings():
    assert VisionConfig.from_settings("", "llava") is None
    assert VisionConfig.from_settings("  ", "llava") is None
    config = VisionConfig.from_settings("http://127.0.0.1:11434/v1/", "llava", "secret")
    assert config is not None and config.completions_url == "http://127.0.0.1:11434/v1/chat/completions"
    assert "secret" not in repr(config)
    with pytest.raises(InputError, match="ftp://host/v1"):
        VisionConfig(base_url="ftp://host/v1", model="llava")
    with pytest.raises(InputError, match="http"):
        VisionConfig.from_settings("127.0.0.1:11434", "llava")
