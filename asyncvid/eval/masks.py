"""Where the object is in each frame: every pixel far from the frame's border colour (the background)."""

from __future__ import annotations

import numpy as np

FOREGROUND = 60.0  # RGB distance from the background that counts as object
MIN_PIXELS = 12  # fewer object pixels than this in a frame: nothing there


def as_uint8(frames) -> np.ndarray:
    """(frames, H, W, 3) uint8 from uint8 or floats in [0, 1]; one image becomes a one-frame video."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (frames, height, width, 3), got shape {frames.shape}")
    return frames


def object_masks(frames) -> np.ndarray:
    """Boolean (frames, height, width): pixels far from the frame's border colour."""
    frames = as_uint8(frames).astype(np.float32)
    border = np.concatenate([frames[:, 0], frames[:, -1], frames[:, :, 0], frames[:, :, -1]], axis=1)
    background = np.median(border, axis=1)[:, None, None, :]
    return np.linalg.norm(frames - background, axis=-1) > FOREGROUND


def seen_frames(masks: np.ndarray) -> list[int]:
    """Indices of the frames that show an object."""
    return [i for i in range(len(masks)) if masks[i].sum() >= MIN_PIXELS]
