"""Library and variants through gradio_client: upload, hooks, preview, /make_variants -> /job_status."""

from __future__ import annotations

import time
import zipfile
from pathlib import Path

import pytest
from gradio_client import Client, handle_file

from tests.test_variants_media import make_clip, make_tone


@pytest.fixture(scope="module")
def client(app):
    return Client(app.url, verbose=False)


def test_library_hooks_and_a_variant_batch_through_the_api(client, tmp_path):
    clip, tone = make_clip(tmp_path / "-y.mp4"), make_tone(tmp_path / "music.wav", 440)
    added = client.predict(
        [handle_file(str(clip)), handle_file(str(tone))], "api, test", "", api_name="/library_add"
    )
    assert [a["kind"] for a in added] == ["video", "audio"] and added[0]["name"] == "-y"
    assert added[0]["tags"] == ["api", "test"] and added[1]["duration"] == pytest.approx(3.0, abs=0.1)
    hooks = client.predict("a':textfile=/etc/passwd:x='\n%{eif:1/0:d}", "api", api_name="/add_hooks")
    assert [h["text"] for h in hooks] == ["a':textfile=/etc/passwd:x='", "%{eif:1/0:d}"]
    items = client.predict("video", "", "api", "", api_name="/library_items")
    assert added[0]["id"] in {i["id"] for i in items}

    selection = dict(videos=[added[0]["id"]], audios=[added[1]["id"]], hook_categories=["api"], per_video=2)
    plan = client.predict(**selection, api_name="/preview_variants")
    assert plan["count"] == 2 and [v["hook"] for v in plan["variants"]] == [h["text"] for h in hooks]
    batch = client.predict(**selection, api_name="/make_variants")
    deadline = time.monotonic() + 120
    while (status := client.predict(batch["batch_id"], api_name="/job_status"))["status"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    assert status["status"] == "succeeded", status
    assert status["result"]["ok"] == 2 and status["result"]["failed"] == 0
    archive = client.predict(batch["batch_id"], api_name="/batch_zip")
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == sorted(Path(v["file"]).name for v in status["result"]["variants"])

    with pytest.raises(Exception, match="no videos selected"):
        client.predict(audios=[added[1]["id"]], api_name="/make_variants")
    assert client.predict(added[1]["id"], api_name="/library_delete") == {"deleted": 1}


def test_speak_saves_speech_into_the_audio_library(client):
    short = client.predict("Hello there.", api_name="/speak")
    long = client.predict(
        "Hello there. This is a much longer sentence, spoken by the built in voice. "
        "And a third one, to be sure.",
        "en",
        1.0,
        api_name="/speak",
    )
    assert short["kind"] == "audio" and short["backend"] == "espeak" and "tts" in short["tags"]
    assert 0.3 < short["duration"] < long["duration"]
    assert short["name"].startswith("speech: Hello there.")
    with pytest.raises(Exception, match="(?i)speed"):
        client.predict("x", "en", 9.0, api_name="/speak")
    audios = {i["id"] for i in client.predict("audio", "speech", "", "", api_name="/library_items")}
    assert {short["id"], long["id"]} <= audios


def test_image_to_clip_with_a_camera_move(client, tmp_path):
    from PIL import Image, ImageDraw

    png = tmp_path / "still.png"
    im = Image.new("RGB", (320, 180), "white")
    ImageDraw.Draw(im).ellipse((140, 70, 180, 110), fill="black")
    im.save(png)
    [image] = client.predict([handle_file(str(png))], "", "", api_name="/library_add")
    clip = client.predict(image["id"], "zoom_in+pan_right", 0.3, 1.0, 12, "", api_name="/image_to_clip")
    assert clip["kind"] == "video" and clip["duration"] == pytest.approx(1.0, abs=0.1)
    assert (clip["width"], clip["height"]) == (320, 180) and "motion" in clip["tags"]
    with pytest.raises(Exception, match="camera motion starts from an image|not an image"):
        client.predict(clip["id"], api_name="/image_to_clip")


def test_join_clips_with_audio_and_subtitles(client, tmp_path):
    a, b = make_clip(tmp_path / "a.mp4", seconds=1.0), make_clip(tmp_path / "b.mp4", seconds=1.5)
    tone = make_tone(tmp_path / "bed.wav", 300, seconds=1.0)
    srt = tmp_path / "subs.srt"
    srt.write_text("1\n00:00:00,000 --> 00:00:02,000\nHello from the subtitles\n", encoding="utf-8")
    va, vb, bed = client.predict(
        [handle_file(str(a)), handle_file(str(b)), handle_file(str(tone))], "", "", api_name="/library_add"
    )
    joined = client.predict(
        f"{va['id']},{vb['id']}", bed["id"], handle_file(str(srt)), "", 25, api_name="/join_clips"
    )
    assert joined["kind"] == "video" and joined["duration"] == pytest.approx(2.5, abs=0.15)
    assert joined["has_audio"] and "joined" in joined["tags"]
    with pytest.raises(Exception, match="only videos can be joined|not found"):
        client.predict(f"{va['id']},{bed['id']}", api_name="/join_clips")
    notes = tmp_path / "notes.txt"
    notes.write_text("not subtitles")
    with pytest.raises(Exception, match="must be an .srt file|Invalid file type"):
        client.predict(va["id"], "", handle_file(str(notes)), api_name="/join_clips")
