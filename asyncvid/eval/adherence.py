"""Does a video show what was asked? Colour, shape and direction of motion read from decoded frames.

Deterministic image statistics, no model: the background is the border's median colour, the object is every pixel
far from it, its colour the nearest named colour to the object's median, its shape the share of its bounding box
it fills, its direction the larger axis of the centroid's travel from the first to the last frame; and whether every
frame's own colour is the clip's (a red disc that flashes pink for two frames keeps the clip's colour, not one colour).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asyncvid.eval.clips import COLOURS, DIRECTIONS, Caption
from asyncvid.eval.masks import MIN_PIXELS, as_uint8, object_masks, seen_frames
from asyncvid.eval.temporal import score_consistency

MIN_TRAVEL = 4.0  # pixels of centroid travel below which the object is "still"
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.64  # fill ratios: square ~1, circle ~0.79, triangle ~0.5
SCORES = ("colour", "shape", "direction", "smooth", "steady", "calm", "one_colour")  # each 1.0 or 0.0 per video


@dataclass(frozen=True)
class Reading:
    """What the evaluator sees in a video; None where nothing could be read."""

    colour: str | None
    shape: str | None
    direction: str | None
    travel: float  # pixels the centroid moved along the direction's axis
    present: float  # share of frames with an object
    colour_frames: float = 0.0  # share of the frames showing the object whose own colour is the clip's


def nearest_colour(rgb) -> str:
    """The named colour closest to an RGB triple."""
    names = list(COLOURS)
    table = np.array([COLOURS[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(table - np.asarray(rgb, dtype=np.float32), axis=1)))]


def _shape(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    return "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"


def _direction(dx: float, dy: float) -> tuple[str | None, float]:
    travel = max(abs(dx), abs(dy))
    if travel < MIN_TRAVEL:
        return None, travel
    if abs(dx) >= abs(dy):
        return ("right" if dx > 0 else "left"), travel
    return ("down" if dy > 0 else "up"), travel


def read_video(frames) -> Reading:
    """Colour, shape and direction of the one object in a video (frames, H, W, 3), uint8 or floats in [0, 1]."""
    pixels = as_uint8(frames)
    masks = object_masks(pixels)
    seen = seen_frames(masks)
    if not seen:
        return Reading(None, None, None, 0.0, 0.0)
    colour = nearest_colour(np.median(pixels[seen][masks[seen]], axis=0))
    frame_colours = [nearest_colour(np.median(pixels[i][masks[i]], axis=0)) for i in seen]
    shapes = [_shape(masks[i]) for i in seen]
    shape = max(set(shapes), key=lambda s: (shapes.count(s), s))
    centroids = [np.argwhere(masks[i]).mean(axis=0) for i in (seen[0], seen[-1])]  # (y, x)
    (y0, x0), (y1, x1) = centroids
    direction, travel = _direction(x1 - x0, y1 - y0) if len(seen) > 1 else (None, 0.0)
    return Reading(colour, shape, direction, float(travel), len(seen) / len(masks),
                   frame_colours.count(colour) / len(seen))


def implied_direction(image) -> str | None:
    """The direction a first frame implies: from the side the object sits on towards the far side."""
    mask = object_masks(image)[0]
    if mask.sum() < MIN_PIXELS:
        return None
    y, x = np.argwhere(mask).mean(axis=0)
    h, w = mask.shape
    off_x, off_y = x - (w - 1) / 2, y - (h - 1) / 2
    if abs(off_x) >= abs(off_y):
        return "left" if off_x > 0 else "right"
    return "up" if off_y > 0 else "down"


def _seen(reading: Reading) -> dict:
    """What a score keeps of a reading, rounded for its JSON."""
    return {"colour": reading.colour, "shape": reading.shape, "direction": reading.direction,
            "travel_px": round(reading.travel, 2), "present": round(reading.present, 3),
            "colour_frames": round(reading.colour_frames, 3)}


def _one_colour(reading: Reading) -> float:
    """1.0 when every frame showing the object shows it in the clip's colour: consistency, like smooth and calm, so a
    clip in the wrong colour throughout still counts (the colour score charges that)."""
    return float(reading.colour is not None and reading.colour_frames == 1.0)


def score_video(frames, prompt: str) -> dict:
    """Text-to-video: which of the prompt's colour, shape and direction the video shows (1.0 or 0.0 each)."""
    want = Caption.parse(prompt)
    seen = read_video(frames)
    return {
        "prompt": prompt,
        "seen": _seen(seen),
        "colour": float(seen.colour == want.colour),
        "shape": float(seen.shape == want.shape),
        "direction": float(seen.direction == want.direction),
        **score_consistency(frames),
        "one_colour": _one_colour(seen),
    }


def score_image_video(frames, image) -> dict:
    """Image-to-video: the video keeps the input's colour and shape and moves the way its first frame implies."""
    first = read_video(image)
    seen = read_video(frames)
    want_direction = implied_direction(image)
    return {
        "seen": _seen(seen),
        "want": {"colour": first.colour, "shape": first.shape, "direction": want_direction},
        "colour": float(seen.colour is not None and seen.colour == first.colour),
        "shape": float(seen.shape is not None and seen.shape == first.shape),
        "direction": float(seen.direction is not None and seen.direction == want_direction),
        **score_consistency(frames),
        "one_colour": _one_colour(seen),
    }


def summarize(scores: list[dict]) -> dict:
    """Percentages of videos whose colour, shape and direction match, that move smoothly, steadily and without
    background flicker (asyncvid.eval.temporal) and show the object in one colour throughout, and the worst flicker,
    over a list of scores."""
    if not scores:
        raise ValueError("no scores to summarize; score at least one video")
    keys = [k for k in SCORES if all(k in s for s in scores)]
    summary = {"videos": len(scores), **{k: round(100.0 * sum(s[k] for s in scores) / len(scores), 1) for k in keys}}
    flickers = [s["motion"]["flicker"] for s in scores if "motion" in s and s["motion"]["flicker"] is not None]
    if flickers:
        summary["worst_flicker"] = max(flickers)
    return summary


__all__ = ["DIRECTIONS", "SCORES", "Reading", "implied_direction", "read_video", "score_image_video", "score_video",
           "summarize"]
