"""Models that ship with asyncvid: built in code (or, later, shipped weights) and stored as diffusers folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DiffusionPipeline

from .tiny_models import build_tiny_animatediff, build_tiny_svd


@dataclass(frozen=True)
class EmbeddedModel:
    """A named model that needs no download; `revision` names the folder so a new build never reuses an old one."""

    name: str
    task: str  # "text-to-video" or "image-to-video"
    description: str
    build: Callable[[], DiffusionPipeline]
    revision: str


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            "tiny-animatediff", "text-to-video",
            "SD1.5-shaped UNet + motion adapter (4 levels, 4.8M UNet params), random weights, DDIM",
            build_tiny_animatediff, "r1",
        ),
        EmbeddedModel(
            "tiny-svd", "image-to-video",
            "SVD-xt-shaped spatio-temporal UNet (4 levels), random weights, Euler with Karras sigmas",
            build_tiny_svd, "r1",
        ),
    )
}


def cache_root() -> Path:
    """Where embedded models are stored: $ASYNCVID_HOME, else ~/.cache/asyncvid."""
    return Path(os.environ.get("ASYNCVID_HOME") or Path.home() / ".cache" / "asyncvid")


def materialize(name: str, root: Path | None = None) -> Path:
    """Return the diffusers folder of an embedded model, building and saving it on first use."""
    model = EMBEDDED[name]
    root = root or cache_root()
    target = root / "models" / f"{name}-{model.revision}"
    if (target / "model_index.json").is_file():
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # transformers' save_pretrained writes no weights on ranks other than 0 once a process group exists,
        # so build in a clean interpreter (once per machine; every rank may need it on multi-node runs).
        code = "import sys; from pathlib import Path; from asyncvid.pipelines.embedded import materialize; " \
               "materialize(sys.argv[1], Path(sys.argv[2]))"
        subprocess.run([sys.executable, "-c", code, name, str(root)], check=True)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build into a private folder and rename, so concurrent ranks never load a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.build().save_pretrained(tmp, safe_serialization=True)
        empty = [d.name for d in tmp.iterdir() if d.is_dir() and not any(d.iterdir())]
        if empty:
            raise RuntimeError(f"building {name} left no files in {empty}; the model was not saved")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # a real failure, not another process winning the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
