"""The video demo's world and its evaluator: clips are drawn as captioned, and the checker reads
rendered clips right (~100%) and scores clips that contradict their caption low."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from training.video_demo import config, scenes
from training.video_demo.checker import (
    FACTS,
    MIN_TRAVEL,
    check_clip,
    direction_accuracy,
    direction_of,
    fact_accuracy,
    measure_clip,
)
from training.video_demo.dit import caption_variants
from training.video_demo.scenes import COLORS, DIRECTIONS, SHAPES, Clip, Combo


@pytest.fixture(scope="module")
def clips():
    """Held-out and training combos, several of each shape and direction, with their rendered frames."""
    train, held = scenes.split_combos(config.SEED, config.NUM_HELD_OUT)
    chosen = scenes.sample_clips(1, 48, train) + scenes.sample_clips(2, 24, held)
    return chosen, scenes.render_clips(chosen).numpy()


def test_combos_and_held_out_split():
    combos = scenes.all_combos()
    assert len(combos) == len(COLORS) * len(SHAPES) * len(DIRECTIONS) * (len(COLORS) - 1) == 672
    train, held = scenes.split_combos(config.SEED, config.NUM_HELD_OUT)
    assert len(held) == config.NUM_HELD_OUT and not set(held) & set(train) and len(train) + len(held) == 672
    facts = lambda c: [(f, getattr(c, f)) for f in ("color", "shape", "direction", "background")]
    seen = {pair for c in train for pair in itertools.combinations(facts(c), 2)}
    assert all(pair in seen for c in held for pair in itertools.combinations(facts(c), 2))


def test_captions_parse_in_every_trained_variant():
    for combo in scenes.all_combos():
        for caption in caption_variants(combo):
            assert scenes.parse_caption(caption) == combo
    with pytest.raises(ValueError):
        scenes.parse_caption("a red circle on the left, blue background")


def test_clips_stay_inside_the_frame_and_move_as_captioned(clips):
    chosen, frames = clips
    assert frames.shape == (len(chosen), scenes.NUM_FRAMES, 64, 64, 3) and frames.dtype == np.uint8
    for clip, video in zip(chosen, frames):
        border = np.ones((64, 64), dtype=bool)
        border[scenes.MARGIN:-scenes.MARGIN, scenes.MARGIN:-scenes.MARGIN] = False
        assert (video[:, border] == COLORS[clip.combo.background]).all()  # the shape never reaches the margin
        (x0, y0), (x1, y1) = clip.centroid(0), clip.centroid(scenes.NUM_FRAMES - 1)
        ux, uy = DIRECTIONS[clip.combo.direction]
        travel = (x1 - x0) * ux + (y1 - y0) * uy
        assert 16 * scenes.SPEED_RANGE[0] - 1e-6 <= travel <= 16 * scenes.SPEED_RANGE[1] + 1e-6


def test_same_seed_same_clips():
    a = scenes.sample_clips(5, 8, scenes.all_combos())
    assert a == scenes.sample_clips(5, 8, scenes.all_combos()) != scenes.sample_clips(6, 8, scenes.all_combos())
    assert (scenes.render(a[0]) == scenes.render_clips(a[:1])[0].numpy()).all()


def test_rendered_clips_score_full_marks(clips):
    chosen, frames = clips
    results = [check_clip(video, clip.combo) for clip, video in zip(chosen, frames)]
    assert fact_accuracy(results) >= 0.99 and direction_accuracy(results) == 1.0
    for clip, video in zip(chosen[:8], frames):
        m = measure_clip(video)
        cx, cy = m.frames[8].centroid
        assert abs(cx - clip.centroid(8)[0]) < 1.0 and abs(cy - clip.centroid(8)[1]) < 1.0


def _other(value, options):
    return next(v for v in options if v != value)


def test_clips_against_a_wrong_caption_score_low(clips):
    chosen, frames = clips
    for clip, video in zip(chosen[:12], frames):
        c = clip.combo
        opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[c.direction]
        assert check_clip(video, Combo(c.color, c.shape, opposite, c.background))["direction"] == 0.0
        assert check_clip(video[::-1], c)["direction"] == 0.0  # played backwards
        wrong_color = _other(c.color, [k for k in COLORS if k != c.background])
        assert check_clip(video, Combo(wrong_color, c.shape, c.direction, c.background))["color"] == 0.0
        assert check_clip(video, Combo(c.color, _other(c.shape, SHAPES), c.direction, c.background))["shape"] <= 0.1
        wrong_bg = _other(c.background, [k for k in COLORS if k != c.color])
        assert check_clip(video, Combo(c.color, c.shape, c.direction, wrong_bg))["background"] == 0.0


def test_static_flat_and_noise_clips_fail():
    still = Clip(Combo("red", "square", "right", "blue"), size=18, speed=0.0, x0=32, y0=32)
    result = check_clip(scenes.render(still), still.combo)
    assert result["direction"] == 0.0 and result["color"] == 1.0  # a shape that does not move
    flat = np.zeros((scenes.NUM_FRAMES, 64, 64, 3), dtype=np.uint8)
    result = check_clip(flat, Combo("red", "circle", "left", "black"))
    assert result == {"background": 1.0, "color": 0.0, "shape": 0.0, "direction": 0.0}
    noise = np.random.default_rng(0).integers(0, 256, (scenes.NUM_FRAMES, 64, 64, 3), dtype=np.uint8)
    results = [check_clip(noise, c) for c in scenes.all_combos()[:: 56]]
    assert fact_accuracy(results) < 0.3 and set(results[0]) == set(FACTS)


def test_direction_from_a_track():
    track = [(i, 10 + 1.5 * i, 30 + 0.2 * i) for i in range(17)]
    assert direction_of(track, 17)[0] == "right"
    assert direction_of([(i, 30, 50 - 2 * i) for i in range(17)], 17)[0] == "up"
    assert direction_of([(i, 30 + 0.4 * i, 30) for i in range(17)], 17)[0] == "none"  # 6.4 px < MIN_TRAVEL
    assert 0.4 * 16 < MIN_TRAVEL
    assert direction_of([(i, 10 + 2 * i, 30) for i in range(5)], 17)[0] == "none"  # object in too few frames
