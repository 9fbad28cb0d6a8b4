"""Library and variant planning (rows only, no media), and the end-to-end batch with real ffmpeg media."""

from __future__ import annotations

import pytest

from engine.errors import InputError, NotFoundError
from engine.media.library import Library
from engine.media.variants import VariantsRequest, plan
from engine.store.database import Database, MediaItem


@pytest.fixture
def lib(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'lib.db'}")
    db.create_all()
    yield Library(db, tmp_path / "library")
    db.dispose()


def rows(lib: Library, kind: str, names: list[str], collection_id: str | None = None) -> list[str]:
    ids = []
    with lib.db.session() as s:
        for n in names:
            item = MediaItem(
                kind=kind,
                name=n,
                path=f"/nowhere/{kind}/{n}",
                duration=2.0,
                width=320,
                height=180,
                collection_id=collection_id,
            )
            s.add(item)
            s.commit()
            ids.append(item.id)
    return ids


def names(assignments) -> list[tuple]:
    return [
        (a.video.name, a.audio.name if a.audio else None, a.hook.text if a.hook else None)
        for a in assignments
    ]


def test_round_robin_cycles_audios_and_hooks_in_order(lib):
    v = rows(lib, "video", ["v1", "v2", "v3", "v4", "v5"])
    a = rows(lib, "audio", ["a1", "a2"])
    h = [x.id for x in lib.add_hooks("h1\nh2\nh3")]
    got = names(plan(VariantsRequest.build(videos=v, audios=a, hooks=h), lib))
    assert got == [
        ("v1", "a1", "h1"),
        ("v2", "a2", "h2"),
        ("v3", "a1", "h3"),
        ("v4", "a2", "h1"),
        ("v5", "a1", "h2"),
    ]
    two = names(plan(VariantsRequest.build(videos=v[:2], audios=a, hooks=h, per_video=3), lib))
    assert [x[0] for x in two] == ["v1"] * 3 + ["v2"] * 3
    assert [x[1] for x in two] == ["a1", "a2", "a1", "a2", "a1", "a2"]
    assert [x[2] for x in two] == ["h1", "h2", "h3", "h1", "h2", "h3"]


def test_random_is_seeded_and_cartesian_counts_and_limits(lib):
    v = rows(lib, "video", ["v1", "v2", "v3"])
    a = rows(lib, "audio", ["a1", "a2", "a3"])
    lib.add_hooks("h1\nh2", category="funny")
    r1 = names(
        plan(
            VariantsRequest.build(
                videos=v, audios=a, hook_categories=["funny"], mode="random", seed=7, per_video=4
            ),
            lib,
        )
    )
    r2 = names(
        plan(
            VariantsRequest.build(
                videos=v, audios=a, hook_categories="funny", mode="random", seed=7, per_video=4
            ),
            lib,
        )
    )
    r3 = names(
        plan(
            VariantsRequest.build(
                videos=v, audios=a, hook_categories=["funny"], mode="random", seed=8, per_video=4
            ),
            lib,
        )
    )
    assert r1 == r2 != r3 and len(r1) == 12
    cart = plan(VariantsRequest.build(videos=v, audios=a, hook_categories=["funny"], mode="cartesian"), lib)
    assert len(cart) == 18 and len(set(names(cart))) == 18
    with pytest.raises(InputError, match="makes 18 variants \\(cartesian\\); the limit is 10"):
        plan(
            VariantsRequest.build(videos=v, audios=a, hook_categories=["funny"], mode="cartesian", limit=10),
            lib,
        )


def test_collections_and_bad_selections(lib):
    c = lib.create_collection("video", "beach clips")
    v = rows(lib, "video", ["b1", "b2"], collection_id=c.id)
    a = rows(lib, "audio", ["a1"])
    got = names(plan(VariantsRequest.build(video_collections=[c.id], audios=a), lib))
    assert got == [("b1", "a1", None), ("b2", "a1", None)]
    with pytest.raises(InputError, match="no videos selected"):
        plan(VariantsRequest.build(audios=a), lib)
    with pytest.raises(InputError, match="'a1' is a audio, not a video"):
        plan(VariantsRequest.build(videos=a), lib)
    with pytest.raises(NotFoundError, match="library item 'nope' not found"):
        plan(VariantsRequest.build(videos=["nope"]), lib)
    with pytest.raises(InputError, match="hook category 'none' has no hooks"):
        plan(VariantsRequest.build(videos=v, hook_categories=["none"]), lib)
    with pytest.raises(InputError, match="holds videos, not audios"):
        plan(VariantsRequest.build(videos=v, audio_collections=[c.id]), lib)
    with pytest.raises(InputError, match="a video collection named 'beach clips' already exists"):
        lib.create_collection("video", "beach clips")
    with pytest.raises(InputError, match="output_size='9:16'.*WxH"):
        VariantsRequest.build(videos=v, output_size="9:16")
    with pytest.raises(InputError, match="color='red'.*#ffcc00"):
        VariantsRequest.build(videos=v, color="red")


def test_hooks_from_lines_and_csv(lib):
    lines = lib.add_hooks("  first hook \n\nsecond: with 'quotes' %{eif:1/0:d}\n", category="intro")
    assert [h.text for h in lines] == ["first hook", "second: with 'quotes' %{eif:1/0:d}"]
    csv_hooks = lib.add_hooks('text,category\n"a, b",cta\nplain,\n', category="fallback")
    assert [(h.text, h.category) for h in csv_hooks] == [("a, b", "cta"), ("plain", "fallback")]
    assert lib.hook_categories() == ["cta", "fallback", "intro"]
    with pytest.raises(InputError, match="no hooks given"):
        lib.add_hooks("\n  \n")
    assert lib.delete_hooks([lines[0].id]) == 1 and len(lib.hooks()) == 3
