"""Is a video smooth? Frame-to-frame steps of the object's centroid and of the background's brightness.

Complements asyncvid.eval.adherence (what is shown) with how it moves: a teleport is a step much longer than the
clip's usual one, a wobble is a step back against the clip's overall travel, and flicker is the background's mean
brightness changing from one frame to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from asyncvid.eval.masks import as_uint8, object_masks, seen_frames

JUMP = 2.0  # a step longer than this many median steps is a jump (the "teleport")
STILL = 1.0  # px: median steps shorter than this are mask rounding, not motion; jumps are measured against it
BACKTRACK = 1.0  # px against the overall travel that a step may go before the motion counts as reversing
MIN_TRAVEL = 4.0  # px of overall travel below which there is no direction to step back against
FLICKER = 3.0  # levels of 255 the background's mean brightness may change between frames


@dataclass(frozen=True)
class Consistency:
    """How a video moves: centroid steps (px) between consecutive frames showing the object, the longest step in
    median steps, the longest step back against the overall travel (px), and the background's largest
    frame-to-frame brightness change (levels of 255)."""

    steps: tuple[float, ...]
    jump: float | None  # None: fewer than two frames show the object, so there is no motion to judge
    backtrack: float | None
    flicker: float | None  # None: the object covers every pixel in some frame, so there is no background

    # A video the readings cannot judge is not credited: it is not smooth, steady or calm.
    @property
    def smooth(self) -> bool:
        return self.jump is not None and self.jump <= JUMP

    @property
    def steady(self) -> bool:
        return self.backtrack is not None and self.backtrack <= BACKTRACK

    @property
    def calm(self) -> bool:
        return self.flicker is not None and self.flicker <= FLICKER


def read_consistency(frames) -> Consistency:
    """Centroid steps and background flicker of the one object in a video (frames, H, W, 3)."""
    pixels = as_uint8(frames)
    masks = object_masks(pixels)
    return Consistency(*_motion(masks), flicker=_flicker(pixels, masks))


def _motion(masks: np.ndarray) -> tuple[tuple[float, ...], float | None, float | None]:
    seen = seen_frames(masks)
    if len(seen) < 2:
        return (), None, None
    centroids = np.stack([np.argwhere(masks[i]).mean(axis=0) for i in seen])  # (y, x) per seen frame
    moves = np.diff(centroids, axis=0) / np.diff(seen)[:, None]  # per frame: a frame without the object is no jump
    steps = np.linalg.norm(moves, axis=1)
    jump = float(steps.max() / max(float(np.median(steps)), STILL))
    travel = centroids[-1] - centroids[0]
    length = float(np.linalg.norm(travel))
    backtrack = float(max(0.0, -(moves @ (travel / length)).min())) if length >= MIN_TRAVEL else 0.0
    return tuple(round(float(s), 2) for s in steps), round(jump, 2), round(backtrack, 2)


def _flicker(pixels: np.ndarray, masks: np.ndarray) -> float:
    """Largest change of the mean brightness of the pixels no frame's object covers (the moving object would
    otherwise count as a change of the background)."""
    background = ~masks.any(axis=0)
    if len(pixels) < 2:
        return 0.0
    if background.sum() == 0:
        return None
    brightness = pixels[:, background].astype(np.float32).mean(axis=(1, 2))
    return round(float(np.abs(np.diff(brightness)).max()), 2)


def score_consistency(frames) -> dict:
    """The per-video scores (1.0 or 0.0) smooth, steady and calm, with the readings behind them."""
    c = read_consistency(frames)
    return {"motion": {"jump": c.jump, "backtrack_px": c.backtrack, "flicker": c.flicker},
            "smooth": float(c.smooth), "steady": float(c.steady), "calm": float(c.calm)}


__all__ = ["BACKTRACK", "FLICKER", "JUMP", "Consistency", "read_consistency", "score_consistency"]
