"""Sampling settings a model folder recommends (`sampling.json` beside `model_index.json`), used where the user
sets none. Diffusers folders have no place for them, and they belong to the weights: the tiny models trained here
with a trained text encoder follow the prompt so closely that SD's guidance of 7.5 over-saturates their colours."""

from __future__ import annotations

import json
from pathlib import Path

from asyncvid.errors import UsageError

FILE = "sampling.json"
GUIDANCE = 7.5  # diffusers' default, for folders that recommend nothing
KEYS = ("guidance_scale",)


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
    scale = settings.get("guidance_scale", GUIDANCE)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale < 0:
        raise UsageError(f"'{path}': guidance_scale must be a number >= 0, got {scale!r}; fix or delete it")
    return settings


def write(folder: Path, **settings) -> None:
    """Record the settings a model was measured with in its folder."""
    (Path(folder) / FILE).write_text(json.dumps(settings, indent=2) + "\n")


def guidance(folder: Path) -> float:
    """The guidance scale to use with this model when the user gives none."""
    return float(read(folder).get("guidance_scale", GUIDANCE))
