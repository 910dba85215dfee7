"""The temporal-consistency metric: ground-truth clips move smoothly and steadily on a calm background; a teleport,
a step back and a flickering background are each caught."""

import numpy as np
import pytest

from asyncvid.eval.adherence import summarize
from asyncvid.eval.clips import Caption, all_captions, render
from asyncvid.eval.masks import object_masks
from asyncvid.eval.temporal import read_consistency, score_consistency


@pytest.mark.parametrize("num_frames", [8, 16])
def test_ground_truth_clips_are_smooth_steady_and_calm(num_frames):
    readings = [read_consistency(render(c, seed, num_frames)) for seed in range(2) for c in all_captions()]
    assert all(r.smooth and r.steady and r.calm for r in readings)
    assert max(r.jump for r in readings) <= 1.5 and max(r.flicker for r in readings) < 1.0


def test_a_teleport_is_a_jump():
    """Still for three frames, then half the travel in one step (the issue's tiny-svd clip)."""
    clip = render(Caption("red", "circle", "right"), 0, 16)
    teleport = clip[[0, 0, 0, 1, 2, 9, 10, 11]]
    assert read_consistency(clip[:8]).smooth
    reading = read_consistency(teleport)
    assert not reading.smooth and reading.jump > 4 and reading.steady


def test_a_step_back_is_not_steady():
    clip = render(Caption("blue", "square", "up"), 0, 16)
    wobble = clip[[0, 2, 4, 6, 4, 8, 10, 12]]
    reading = read_consistency(wobble)
    assert not reading.steady and reading.backtrack > 2


@pytest.mark.parametrize("swing, calm", [(2, True), (6, False)])
def test_background_flicker_is_measured_in_levels(swing, calm):
    """Alternate frames' background brightened by `swing` levels (the object left as it is)."""
    clip = render(Caption("green", "triangle", "left"), 0, 8).astype(np.int16)
    background = ~object_masks(clip.astype(np.uint8))
    clip[1::2][background[1::2]] += swing
    reading = read_consistency(clip.clip(0, 255).astype(np.uint8))
    assert reading.calm is calm and reading.flicker == pytest.approx(swing, abs=0.2)
    assert reading.smooth and reading.steady


def test_one_bright_frame_is_the_flicker():
    """A single frame 6 levels brighter: the worst change counts, not a typical one."""
    clip = render(Caption("blue", "square", "up"), 0, 8).astype(np.int16)
    background = ~object_masks(clip.astype(np.uint8))
    clip[4][background[4]] += 6
    reading = read_consistency(clip.clip(0, 255).astype(np.uint8))
    assert not reading.calm and reading.flicker == pytest.approx(6, abs=0.2)


def test_summary_reports_motion_shares_and_the_worst_flicker():
    clip = render(Caption("red", "circle", "right"), 0, 16)
    scores = [score_consistency(clip[:8]), score_consistency(clip[[0, 0, 0, 1, 2, 9, 10, 11]])]
    scores = [{"colour": 1.0, "shape": 1.0, "direction": 1.0, **s} for s in scores]
    summary = summarize(scores)
    assert (summary["smooth"], summary["steady"], summary["calm"]) == (50.0, 100.0, 100.0)
    assert summary["worst_flicker"] == max(s["motion"]["flicker"] for s in scores)


def test_a_frame_without_the_object_is_not_a_jump():
    """Two frames lose the object (too faint to see): the step across the gap is two frames' travel, not a jump."""
    clip = render(Caption("red", "circle", "right"), 0, 16)
    gappy = clip.copy()
    gappy[[5, 6]] = clip[0, 0, 0]  # the background's tone everywhere
    reading = read_consistency(gappy)
    assert reading.smooth and reading.steady and reading.jump < 1.5


def test_nothing_to_judge_is_not_credited():
    """A video with no object, or whose object covers every pixel of a frame, is neither smooth, steady nor calm."""
    clip = render(Caption("blue", "triangle", "down"), 0, 8)
    empty = np.broadcast_to(clip[:, :1, :1], clip.shape).copy()
    assert read_consistency(empty).jump is None
    assert not any((read_consistency(empty).smooth, read_consistency(empty).steady))
    noise = np.random.default_rng(0).integers(0, 256, clip.shape, dtype=np.uint8)
    assert read_consistency(noise).flicker is None and not read_consistency(noise).calm
    assert summarize([score_consistency(empty), score_consistency(clip)]).get("worst_flicker", 0) < 1.0


def test_a_still_object_shifting_a_pixel_is_not_a_jump():
    """Mask rounding moves a still object by a pixel now and then; that is neither a jump nor a step back."""
    clip = render(Caption("green", "square", "left"), 0, 16)[[0] * 8]
    clip[4:] = np.roll(clip[4:], (1, 1), axis=(1, 2))  # one pixel down and across: 1.4 px
    reading = read_consistency(clip)
    assert reading.smooth and reading.steady
