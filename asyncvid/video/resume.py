"""Resuming a batch: an output whose sidecar records the same settings is done, and a rerun skips it."""

from __future__ import annotations

import json
from pathlib import Path

from asyncvid.errors import UsageError
from asyncvid.video.naming import sidecar_path


def settings_of(request, spec) -> dict:
    """What decides a video's content: the request and the model, sampler, scheduler and precision asked for."""
    return {"request": request.describe(), **spec.describe()}


def recorded_settings(target: Path) -> dict | None:
    """The settings in `target`'s sidecar; None when the output or a readable sidecar with settings is missing."""
    sidecar = sidecar_path(target)
    if not target.exists() or not sidecar.is_file():
        return None
    try:
        recorded = json.loads(sidecar.read_text(encoding="utf-8")).get("settings")
    except (OSError, ValueError, AttributeError):
        return None
    return recorded if isinstance(recorded, dict) else None


def to_make(requests: list, targets: list[Path], spec, *, overwrite: bool) -> list[bool]:
    """Per target, whether to make it: not when it exists with the same settings (unless `overwrite`); an output
    that exists with other settings is refused before any work, unless `overwrite`."""
    if overwrite:
        return [True] * len(targets)
    make = []
    for request, target in zip(requests, targets):
        recorded = recorded_settings(target)
        wanted = json.loads(json.dumps(settings_of(request, spec), default=str))  # as the sidecar stores it
        if recorded is None and target.exists():
            raise UsageError(f"output '{target}' already exists without a sidecar from asyncvid; pass --overwrite "
                             f"to replace it or choose another --out")
        if recorded is not None and recorded != wanted:
            changed = _differences(wanted, recorded)
            raise UsageError(f"output '{target}' exists with other settings ({', '.join(changed)} differ); pass "
                             f"--overwrite to replace it or choose another --out")
        make.append(recorded is None)
    return make


def _differences(wanted: dict, recorded: dict, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ ("request.seed", "sampler")."""
    found = []
    for key in sorted(wanted.keys() | recorded.keys()):
        a, b = wanted.get(key), recorded.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key == "request":
            found += _differences(a, b, f"{key}.")
        elif a != b:
            found.append(prefix + key)
    return found
