"""Procedural clips for training and evaluating the embedded models: one coloured shape moving over a background.

A clip is fixed by its caption ("a red circle moving left") and a seed. The shape starts near the edge it moves
away from and travels towards the far side, so a first frame alone implies the direction (what image-to-video
models are scored on). Frames are uint8 arrays (frames, 64, 64, 3).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {
    "red": (220, 40, 40),
    "orange": (245, 140, 20),
    "yellow": (235, 215, 30),
    "green": (40, 175, 60),
    "cyan": (30, 200, 215),
    "blue": (40, 70, 225),
    "purple": (140, 50, 200),
    "pink": (245, 125, 195),
}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (dx, dy) in image coordinates
BACKGROUNDS = ((235, 235, 220), (200, 200, 200), (150, 150, 150), (90, 90, 90), (35, 35, 45), (225, 232, 240))
SIZE = 64
TRAVEL = 30.0  # pixels covered from the first to the last frame, whatever the frame count
START = (14.0, 20.0)  # pixels off centre, on the side opposite the motion
RADIUS = (8.0, 11.0)  # of the circle; a square fills its bounding box, a triangle has about its area
VERSION = 2  # bump when clips change, so cached training latents are not reused (2: squares on the circle's box)
CAPTION = re.compile(r"^\s*an? (\w+) (\w+) moving (\w+)\s*$")


@dataclass(frozen=True)
class Caption:
    """What a clip shows, in the prompt grammar "a <colour> <shape> moving <direction>"."""

    colour: str
    shape: str
    direction: str

    def __post_init__(self):
        for value, known in ((self.colour, COLOURS), (self.shape, SHAPES), (self.direction, DIRECTIONS)):
            if value not in known:
                raise ValueError(f"'{value}' is not one of {', '.join(known)}")

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction}"

    @classmethod
    def parse(cls, prompt: str) -> Caption:
        """Read a prompt in the caption grammar; ValueError names the prompt and the grammar."""
        match = CAPTION.match(prompt.lower())
        if not match:
            raise ValueError(f"prompt '{prompt}' is not of the form 'a <colour> <shape> moving <direction>'")
        return cls(*match.groups())


def all_captions() -> list[Caption]:
    """Every colour x shape x direction combination, in a fixed order."""
    return [Caption(c, s, d) for c, s, d in product(COLOURS, SHAPES, DIRECTIONS)]


def heldout_captions() -> list[Caption]:
    """50 combinations never shown in training; every colour-shape, colour-direction and shape-direction pair
    still occurs in training, so each word is learnt in other company."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    held = [c for c in all_captions()
            if (colours.index(c.colour) + SHAPES.index(c.shape) + directions.index(c.direction)) % 2 == 0]
    # Top up to 50 in a fixed order with combinations whose pairs all stay in training.
    for extra in all_captions():
        if len(held) == 50:
            break
        rest = [c for c in all_captions() if c not in held and c != extra]
        if extra not in held and all(_pairs(rest) >= _pairs([c]) for c in all_captions()):
            held.append(extra)
    return held


def _pairs(captions: list[Caption]) -> set:
    return {p for c in captions for p in (("cs", c.colour, c.shape), ("cd", c.colour, c.direction),
                                          ("sd", c.shape, c.direction))}


def training_captions() -> list[Caption]:
    """The combinations the embedded models are trained on (all but the held-out ones)."""
    held = set(heldout_captions())
    return [c for c in all_captions() if c not in held]


def _coverage(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (positive inside) of each pixel centre."""
    if shape == "circle":
        inside = radius - np.hypot(dx, dy)
    elif shape == "square":
        # On the circle's bounding box, not of its area (half-side 0.85 radius, VERSION 1): the corners are all that
        # tells the two apart, and in the VAE's latents they differ 2.7 times as much (docs/MODELS.md, round 15).
        inside = radius - np.maximum(np.abs(dx), np.abs(dy))
    else:  # an upright equilateral triangle with its centroid at the centre
        r = radius * 1.25
        half_root3 = np.sqrt(3) / 2
        inside = r / 2 - np.maximum(dy, np.maximum(half_root3 * dx - dy / 2, -half_root3 * dx - dy / 2))
    return np.clip(inside + 0.5, 0.0, 1.0)


def _background(rng: np.random.Generator, plain: int | None = None) -> np.ndarray:
    """A plain background, or (a third of the time) one with faint stripes or a gradient; `plain` picks the plain
    tone BACKGROUNDS[plain] instead (with the same draws, so the rest of the clip is the same)."""
    index, kind = rng.integers(len(BACKGROUNDS)), rng.integers(6)
    period, slant = (rng.uniform(6, 14), rng.uniform(-1, 1)) if kind == 0 else (None, None)  # stripes' draws
    if plain is not None:
        index, kind = plain, 2
    img = np.broadcast_to(np.array(BACKGROUNDS[index], dtype=np.float32), (SIZE, SIZE, 3)).copy()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    if kind == 0:
        img += 10.0 * np.sign(np.sin((xx + yy * slant) * 2 * np.pi / period))[..., None]
    elif kind == 1:
        img += (20.0 * (yy / SIZE - 0.5))[..., None]
    return img


def _start(rng: np.random.Generator, dx: int, dy: int) -> tuple[float, float]:
    """Where a clip moving (dx, dy) starts: START px off centre on the side opposite the motion, at most 8 px off
    centre across it."""
    along, across = -rng.uniform(*START), rng.uniform(-8.0, 8.0)
    return SIZE / 2 + (along * dx if dx else across), SIZE / 2 + (along * dy if dy else across)


def render(caption: Caption, seed: int, num_frames: int = 16, background: int | None = None,
           colour: str | None = None) -> np.ndarray:
    """The clip of `caption` for `seed`: uint8 (num_frames, 64, 64, 3); `background` forces a plain tone (an index
    into BACKGROUNDS), `colour` draws the object in another of COLOURS with the rest of the clip unchanged."""
    rng = np.random.default_rng([seed, len(caption.text), *caption.text.encode()])
    background = _background(rng, background)
    radius = rng.uniform(*RADIUS)
    dx, dy = DIRECTIONS[caption.direction]
    x0, y0 = _start(rng, dx, dy)
    rgb = np.array(COLOURS[colour or caption.colour], dtype=np.float32)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    frames = np.empty((num_frames, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(num_frames):
        t = i / max(num_frames - 1, 1)
        cx, cy = x0 + dx * TRAVEL * t, y0 + dy * TRAVEL * t
        alpha = _coverage(caption.shape, xx - cx, yy - cy, radius)[..., None]
        frames[i] = np.clip(background * (1 - alpha) + rgb * alpha, 0, 255).round().astype(np.uint8)
    return frames


def render_shapes(seed: int, background: int | None = None) -> tuple[str, np.ndarray]:
    """One frame's geometry (background, colour, size, a place on some clip's path) drawn by `seed`, rendered once
    per shape: (colour, uint8 (3 shapes, 64, 64, 3)). Frames that differ only in the shape, for training the shape
    word on what tells the shapes apart (asyncvid.training.animatediff.pair_loss_fn); `background` as in `render`."""
    rng = np.random.default_rng([seed, 0x5A])
    background = _background(rng, background)
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    radius = rng.uniform(*RADIUS)
    dx, dy = DIRECTIONS[list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]]
    (x0, y0), t = _start(rng, dx, dy), rng.uniform()
    cx, cy = x0 + dx * TRAVEL * t, y0 + dy * TRAVEL * t
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    rgb = np.array(COLOURS[colour], dtype=np.float32)
    frames = [background * (1 - a) + rgb * a for a in (_coverage(s, xx - cx, yy - cy, radius)[..., None]
                                                         for s in SHAPES)]
    return colour, np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


def render_colours(seed: int, background: int | None = None) -> tuple[str, np.ndarray]:
    """One frame's geometry (background, shape, size, a place on some clip's path) drawn by `seed`, rendered once
    per colour: (shape, uint8 (8 colours, 64, 64, 3)). Frames that differ only in the colour, for training the
    colour word on what tells neighbouring hues apart (asyncvid.training.animatediff.pair_loss_fn); `background` as
    in `render`."""
    rng = np.random.default_rng([seed, 0xC0])
    background = _background(rng, background)
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(*RADIUS)
    dx, dy = DIRECTIONS[list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]]
    (x0, y0), t = _start(rng, dx, dy), rng.uniform()
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    alpha = _coverage(shape, xx - (x0 + dx * TRAVEL * t), yy - (y0 + dy * TRAVEL * t), radius)[..., None]
    frames = [background * (1 - alpha) + np.array(rgb, dtype=np.float32) * alpha for rgb in COLOURS.values()]
    return shape, np.clip(np.stack(frames), 0, 255).round().astype(np.uint8)


HELDOUT_IMAGE_SEED = 100_000  # image i of heldout_images is rendered at this seed + i: none a training clip uses


def heldout_images() -> list[tuple[Caption, int]]:
    """The image-to-video evaluation set: every shape in every colour on every plain background (144 images), each
    with one of its colour and shape's held-out captions, the backgrounds taking turns over them; (caption,
    background index into BACKGROUNDS) pairs."""
    held = heldout_captions()
    images = []
    for b in range(len(BACKGROUNDS)):
        for colour in COLOURS:
            for shape in SHAPES:
                directions = [h for h in held if (h.colour, h.shape) == (colour, shape)]
                images.append((directions[b % len(directions)], b))
    return images


def write_heldout_images(folder) -> list:
    """The image-to-video evaluation's inputs (heldout_images) as `<i>-<caption>-on-<background>.png` under
    `folder` (`python -m asyncvid.eval.clips FOLDER`); their seeds are none a training clip uses."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (caption, background) in enumerate(heldout_images()):
        path = folder / f"{i:03d}-{caption.text.replace(' ', '-')}-on-{background}.png"
        Image.fromarray(render(caption, HELDOUT_IMAGE_SEED + i, 1, background)[0]).save(path)
        paths.append(path)
    return paths


if __name__ == "__main__":

    usage = "usage: python -m asyncvid.eval.clips FOLDER  (writes the image-to-video evaluation set there)"
    if sys.argv[1:] in (["-h"], ["--help"]):
        print(usage)
    elif len(sys.argv) != 2 or sys.argv[1].startswith("-"):  # an option is not a folder to fill with 144 images
        print(usage, file=sys.stderr)
        sys.exit(2)
    else:
        print(f"wrote {len(write_heldout_images(sys.argv[1]))} images to {sys.argv[1]}")
