"""Sampling settings a model folder recommends (`sampling.json` beside `model_index.json`), used where the user
sets none. Diffusers folders have no place for them, and they belong to the weights: the tiny models trained here
with a trained text encoder follow the prompt so closely that SD's guidance of 7.5 over-saturates their colours,
tiny-animatediff flickers less and moves more evenly when its frames start from one noise with no mean
(pipelines/initial_noise.py), and tiny-svd keeps its input's colour and shape more often when its guidance ramp
ends below SVD's 3."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from asyncvid.errors import UsageError

FILE = "sampling.json"
GUIDANCE = 7.5  # diffusers' default, for folders that recommend nothing
MAX_GUIDANCE = 3.0  # SVD's: its guidance rises from 1 at the first frame to this at the last
KEYS = ("guidance_scale", "shared_noise", "noise_mean", "shared_grid", "max_guidance_scale")


@dataclass(frozen=True)
class Recommended:
    """What a model is sampled with where the user sets nothing: diffusers' defaults unless its folder says."""

    guidance_scale: float = GUIDANCE
    shared_noise: float = 0.0  # the share of each frame's initial noise common to all frames; 0: independent
    max_guidance_scale: float = MAX_GUIDANCE  # image-to-video: the guidance at the last frame
    noise_mean: float = 1.0  # the scale of each frame's initial noise mean; 1: as drawn, 0: zero-mean noise
    shared_grid: int = 1  # the frames share their noise's means over a G x G grid; 1: only the whole frame's


def read(folder: Path) -> dict:
    """The folder's recommended settings ({} without a sampling.json); a malformed file is a one-line error."""
    path = Path(folder) / FILE
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UsageError(f"'{path}' is not valid JSON ({err}); fix or delete it") from None
    unknown = sorted(set(settings) - set(KEYS)) if isinstance(settings, dict) else None
    if unknown is None or unknown:
        raise UsageError(f"'{path}' may hold only {', '.join(KEYS)}, got {unknown or settings!r}; fix or delete it")
    for key in ("guidance_scale", "max_guidance_scale"):
        scale = settings.get(key, 0)
        if not _number(scale) or scale < 0:
            raise UsageError(f"'{path}': {key} must be a number >= 0, got {scale!r}; fix or delete it")
    share = settings.get("shared_noise", 0.0)
    if not _number(share) or not 0 <= share <= 1:
        raise UsageError(f"'{path}': shared_noise must be a number in [0, 1], got {share!r}; fix or delete it")
    mean = settings.get("noise_mean", 1.0)
    if not _number(mean) or not 0 <= mean <= 1:
        raise UsageError(f"'{path}': noise_mean must be a number in [0, 1], got {mean!r}; fix or delete it")
    grid = settings.get("shared_grid", 1)
    if not isinstance(grid, int) or isinstance(grid, bool) or grid < 1:
        raise UsageError(f"'{path}': shared_grid must be a whole number >= 1, got {grid!r}; fix or delete it")
    return settings


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def write(folder: Path, **settings) -> None:
    """Record the settings a model was measured with in its folder."""
    (Path(folder) / FILE).write_text(json.dumps(settings, indent=2) + "\n")


def recommended(folder: Path) -> Recommended:
    """The settings to use with this model where the user gives none."""
    kinds = {name: type(field.default) for name, field in Recommended.__dataclass_fields__.items()}  # float, int
    return Recommended(**{key: kinds[key](value) for key, value in read(folder).items()})
