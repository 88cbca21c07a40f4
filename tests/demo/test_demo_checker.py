"""The demo's scene generator and pixel checker, on ground-truth images (no model involved)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from training.demo.checker import FACTS, agreement, check, measure
from training.demo.scenes import (COLORS, POSITIONS, SHAPES, Combo, Scene, all_combos, parse_caption, render,
                                  render_dataset, split_combos)

OTHER = {"color": lambda c: next(x for x in COLORS if x not in (c.color, c.background)),
         "background": lambda c: next(x for x in COLORS if x not in (c.color, c.background)),
         "shape": lambda c: next(x for x in SHAPES if x != c.shape),
         "position": lambda c: next(x for x in POSITIONS if x != c.position)}


@pytest.fixture(scope="module")
def scenes():
    return render_dataset(seed=123, count=300, combos=all_combos())


def test_all_combos_and_captions_roundtrip():
    combos = all_combos()
    assert len(combos) == len(set(combos)) == 8 * 3 * 5 * 7
    assert all(parse_caption(c.caption) == c for c in combos)
    assert parse_caption("A Red circle on the left, blue background") == Combo("red", "circle", "left", "blue")
    for bad in ("a red circle on the left", "a red circle on the left, red background",
                "a pink circle on the left, blue background", "two red circles on the left, blue background"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_render_is_deterministic_and_exact():
    a, scenes_a = render_dataset(seed=7, count=20, combos=all_combos())
    b, scenes_b = render_dataset(seed=7, count=20, combos=all_combos())
    assert scenes_a == scenes_b and np.array_equal(a, b)
    assert not np.array_equal(a, render_dataset(seed=8, count=20, combos=all_combos())[0])
    image = render(Scene(Combo("orange", "square", "right", "purple"), size=20, dx=2, dy=-1))
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    assert tuple(image[0, 0]) == COLORS["purple"] and tuple(image[31, 50]) == COLORS["orange"]
    assert (image == COLORS["orange"]).all(-1).sum() == 20 * 20


def test_checker_reads_every_fact_of_ground_truth(scenes):
    images, truth = scenes
    results = [check(image, s.combo) for image, s in zip(images, truth)]
    assert agreement(results) == 1.0
    for image, s in zip(images[:50], truth):
        m = measure(image)
        assert abs(m.centroid[0] - s.centroid[0]) < 1.0 and abs(m.centroid[1] - s.centroid[1]) < 1.0


@pytest.mark.parametrize("fact", FACTS)
def test_checker_rejects_a_wrong_caption(scenes, fact):
    images, truth = scenes
    for image, s in zip(images[:60], truth):
        wrong = dataclasses.replace(s.combo, **{fact: OTHER[fact](s.combo)})
        result = check(image, wrong)
        assert result[fact] is False, (s, fact)
        assert all(ok for f, ok in result.items() if f != fact)


def test_checker_survives_blur_and_noise(scenes):
    """Generated images are soft-edged: a 3x3 box blur plus noise must not change the reading."""
    images, truth = scenes
    rng = np.random.default_rng(0)
    results = []
    for image, s in zip(images[:100], truth):
        x = image.astype(np.float64)
        padded = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = sum(padded[dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)) / 9
        noisy = np.clip(blurred + rng.normal(0, 8, blurred.shape), 0, 255).astype(np.uint8)
        results.append(check(noisy, s.combo))
    assert agreement(results) >= 0.98


def test_checker_on_an_empty_or_wrong_picture():
    combo = Combo("red", "circle", "left", "blue")
    blank = np.zeros((64, 64, 3), np.uint8)
    blank[:] = COLORS["blue"]
    assert check(blank, combo) == {"background": True, "color": False, "position": False, "shape": False}
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert agreement([check(noise, combo)]) < 0.75
    # Two facts wrong at once: a blue square on the right of a red background.
    other = render(Scene(Combo("blue", "square", "right", "red")))
    assert check(other, combo) == {"background": False, "color": False, "position": False, "shape": False}


def test_held_out_split():
    train, held = split_combos(seed=0, num_held_out=48)
    assert len(held) == 48 and len(train) + len(held) == len(all_combos())
    assert not set(train) & set(held)
    assert split_combos(seed=0, num_held_out=48) == (train, held)
    assert split_combos(seed=1, num_held_out=48)[1] != held
    # every pair of facts of a held-out combo still occurs in training
    for c in held:
        for a, b in [("color", "shape"), ("color", "position"), ("color", "background"), ("shape", "position"),
                     ("shape", "background"), ("position", "background")]:
            assert any(getattr(t, a) == getattr(c, a) and getattr(t, b) == getattr(c, b) for t in train), (c, a, b)
    # and the held-out prompts cover every value of every fact
    for fact, values in [("color", COLORS), ("shape", SHAPES), ("position", POSITIONS), ("background", COLORS)]:
        assert {getattr(c, fact) for c in held} == set(values)
