"""Procedural clips: deterministic by seed, held-out prompts disjoint from training, grammar round trip."""

from pathlib import Path

import numpy as np
import pytest

from asyncvid.eval.clips import (
    COLOURS,
    DIRECTIONS,
    SHAPES,
    Caption,
    all_captions,
    heldout_captions,
    render,
    render_colours,
    render_shapes,
    training_captions,
)
from asyncvid.video.naming import read_prompts

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def test_same_seed_same_clip_and_other_seed_other_clip():
    c = Caption("red", "circle", "left")
    a, b = render(c, 3, 8), render(c, 3, 8)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, render(c, 4, 8))


def test_heldout_prompts_are_never_trained_on_yet_every_word_pair_is():
    held, train = heldout_captions(), training_captions()
    assert len(held) == len(set(held)) == 50
    assert not set(held) & set(train)
    assert len(held) + len(train) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS)
    for a, b in (("colour", "shape"), ("colour", "direction"), ("shape", "direction")):
        pairs = {(getattr(c, a), getattr(c, b)) for c in all_captions()}
        assert {(getattr(c, a), getattr(c, b)) for c in train} == pairs


def test_sample_prompt_files_use_the_caption_grammar():
    held = read_prompts(SAMPLES / "heldout_prompts.txt")
    assert [Caption.parse(p) for p in held] == heldout_captions()
    for p in read_prompts(SAMPLES / "prompt.txt"):
        Caption.parse(p)


def test_caption_grammar_round_trip_and_errors():
    assert Caption.parse("A Blue Square moving up").text == "a blue square moving up"
    with pytest.raises(ValueError, match="'teal' is not one of"):
        Caption.parse("a teal circle moving left")
    with pytest.raises(ValueError, match="is not of the form"):
        Caption.parse("a circle")


@pytest.mark.parametrize("direction", list(DIRECTIONS))
def test_the_shape_moves_the_captioned_way(direction):
    clip = render(Caption("green", "square", direction), 0, 16).astype(float)
    masks = np.abs(clip - clip[:, :1, :1]).sum(-1) > 60  # far from the corner colour
    (y0, x0), (y1, x1) = (np.argwhere(masks[i]).mean(0) for i in (0, -1))
    dx, dy = DIRECTIONS[direction]
    assert np.sign(round(x1 - x0)) == dx and np.sign(round(y1 - y0)) == dy


def test_heldout_images_show_every_colour_and_shape_on_every_background(tmp_path):
    """The image-to-video set: 144 held-out captions, each shape in each colour on each plain background, written
    as images whose background is the named tone and whose first frame points the caption's way."""
    from PIL import Image

    from asyncvid.eval.adherence import implied_direction, read_video
    from asyncvid.eval.clips import BACKGROUNDS, heldout_images, write_heldout_images

    images = heldout_images()
    held = set(heldout_captions())
    assert len(images) == 144 and all(c in held for c, _ in images)
    assert {(c.colour, c.shape, b) for c, b in images} == {
        (c, s, b) for c in COLOURS for s in SHAPES for b in range(len(BACKGROUNDS))}
    paths = write_heldout_images(tmp_path)
    for path, (caption, background) in zip(paths, images):
        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        assert tuple(pixels[0, 0]) == BACKGROUNDS[background], path.name
        assert implied_direction(pixels) == caption.direction, path.name
        seen = read_video(pixels)
        assert (seen.colour, seen.shape) == (caption.colour, caption.shape), path.name


def test_a_forced_background_changes_nothing_else_of_the_clip():
    """Forcing the tone keeps the shape's size, start and motion (the background's draws are made either way)."""
    from asyncvid.eval.clips import BACKGROUNDS
    from asyncvid.eval.masks import object_masks

    caption = Caption("red", "square", "up")
    for seed in range(40):  # striped backgrounds draw more than plain ones: a fifth of these seeds draw stripes
        free, forced = render(caption, seed, 8), render(caption, seed, 8, background=3)
        masks = [object_masks(clip) for clip in (free, forced)]
        centroids = [[np.argwhere(m).mean(0) for m in clip_masks] for clip_masks in masks]
        assert np.allclose(*centroids, atol=0.75), seed  # the edge pixels counted differ with the contrast
        sizes = [[np.ptp(np.argwhere(m), axis=0) for m in clip_masks] for clip_masks in masks]
        assert np.allclose(*sizes, atol=2.5), seed  # the same size (the radius is drawn after the background)
        assert (forced[:, 0, 0] == BACKGROUNDS[3]).all()


def test_colour_frames_differ_only_in_the_colour():
    """render_colours draws one geometry in each colour: the evaluator reads every colour in one shape, and the
    frames differ only where the shape is (same background, place and size)."""
    from asyncvid.eval.adherence import read_video
    from asyncvid.eval.masks import object_masks

    for seed in range(6):
        shape, frames = render_colours(seed)
        assert np.array_equal(frames, render_colours(seed)[1])
        readings = [read_video(frame[None]) for frame in frames]
        assert [(r.colour, r.shape) for r in readings] == [(c, shape) for c in COLOURS], seed
        centroids = [np.argwhere(object_masks(frame[None])[0]).mean(0) for frame in frames]
        assert np.ptp(centroids, axis=0).max() < 1.0, seed  # one place
        differ = np.argwhere((frames != frames[0]).any(axis=(0, 3)))
        assert np.abs(differ - centroids[0]).max() < 16, seed  # nothing changes away from the shape


def test_shape_frames_differ_only_in_the_shape():
    """render_shapes draws one geometry as each shape: the evaluator reads the three shapes in one colour, and the
    frames differ only near the shape (same background, place and size; the square on the circle's bounding box)."""
    from asyncvid.eval.adherence import read_video
    from asyncvid.eval.masks import object_masks

    for seed in range(12):
        colour, frames = render_shapes(seed)
        assert np.array_equal(frames, render_shapes(seed)[1])
        readings = [read_video(frame[None]) for frame in frames]
        assert [(r.colour, r.shape) for r in readings] == [(colour, s) for s in SHAPES], seed
        pixels = [np.argwhere(object_masks(frame[None])[0]) for frame in frames]
        centroids = [p.mean(0) for p in pixels]
        assert np.ptp(centroids, axis=0).max() < 3.0, seed  # one place (a triangle's centroid sits a little lower)
        boxes = [np.ptp(p, axis=0) for p in pixels[:2]]
        assert np.abs(boxes[1] - boxes[0]).max() <= 1, seed  # the square on the circle's box: only corners differ
        differ = np.argwhere((frames != frames[0]).any(axis=(0, 3)))
        assert np.abs(differ - centroids[0]).max() < 16, seed  # nothing changes away from the shape


@pytest.mark.parametrize("arg, code", [("--help", 0), ("--out", 2)])
def test_the_image_set_command_takes_an_option_for_no_folder(tmp_path, arg, code):
    """`python -m asyncvid.eval.clips --help` prints its usage; it once wrote the image set into a folder named
    '--help'."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "asyncvid.eval.clips", arg], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == code and "usage: python -m asyncvid.eval.clips FOLDER" in result.stdout + result.stderr
    assert not any(tmp_path.iterdir())
    written = subprocess.run([sys.executable, "-m", "asyncvid.eval.clips", "set"], cwd=tmp_path, timeout=120)
    assert written.returncode == 0 and len(list((tmp_path / "set").glob("*.png"))) == 144
