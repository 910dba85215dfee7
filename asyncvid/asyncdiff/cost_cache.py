"""Measured unit times, kept on disk per machine and input shape, so a rerun balances its stages on the same
numbers, picks the same split and reproduces its frames (a new split changes AsyncDiff's output)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch

from asyncvid.asyncdiff.costs import public_config

UNITS = 2  # the unit list's version: 2 traced from the native forward (conv_norm_out a unit of its own)


def cache_dir() -> Path:
    """$ASYNCVID_HOME/unit-costs (default ~/.cache/asyncvid/unit-costs)."""
    return Path(os.environ.get("ASYNCVID_HOME") or Path.home() / ".cache" / "asyncvid") / "unit-costs"


def key(unet_config: dict, shapes: list, device: torch.device, dtype: torch.dtype) -> str:
    """What the times depend on: the architecture, the input shapes, the device, dtype, threads and torch."""
    facts = {"units": UNITS, "config": public_config(unet_config), "shapes": shapes,
             "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
             "dtype": str(dtype), "threads": torch.get_num_threads(), "torch": torch.__version__}
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cached(name: str, measure: Callable[[], list[float]]) -> list[float]:
    """The stored times under `name`, or `measure()` stored atomically (an unwritable cache only costs a re-measure)."""
    path = cache_dir() / f"{name}.json"
    try:
        return [float(t) for t in json.loads(path.read_text())["seconds"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    times = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as f:
            json.dump({"seconds": times}, f)
        os.replace(f.name, path)
    except OSError:
        pass
    return times
