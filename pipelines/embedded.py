"""Models that ship with asyncvid: trained tiny pipelines stored in the package (pipelines/weights), copied into
the model cache on first use so every run loads them from one place."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from asyncvid.errors import UsageError

WEIGHTS = Path(__file__).resolve().parent / "weights"


@dataclass(frozen=True)
class EmbeddedModel:
    """A named model that needs no download; `revision` names the cache folder so new weights never reuse old ones."""

    name: str
    task: str  # "text-to-video" or "image-to-video"
    description: str
    revision: str

    @property
    def source(self) -> Path:
        """The shipped diffusers folder (float16 safetensors, configs, model card)."""
        return WEIGHTS / self.name


EMBEDDED = {
    m.name: m
    for m in (
        EmbeddedModel(
            "tiny-animatediff", "text-to-video",
            "SD1.5-shaped UNet + motion modules (4 levels, 4.8M params) trained on moving-shape clips, DDIM",
            "r13.1",  # r13's weights, sampled with every frame on the same noise (sampling.json)
        ),
        EmbeddedModel(
            "tiny-svd", "image-to-video",
            "SVD-xt-shaped spatio-temporal UNet (4 levels, 5.9M params) trained on moving-shape clips, Euler (Karras)",
            "r7",  # r6 (r5 fine-tuned for a calm background) with its decoder fine-tuned to draw the background steadily
        ),
    )
}


def cache_root() -> Path:
    """Where embedded models are stored: $ASYNCVID_HOME, else ~/.cache/asyncvid."""
    return Path(os.environ.get("ASYNCVID_HOME") or Path.home() / ".cache" / "asyncvid")


def materialize(name: str, root: Path | None = None) -> Path:
    """Return the cached diffusers folder of an embedded model, copying it from the package on first use."""
    model = EMBEDDED[name]
    root = root or cache_root()
    target = root / "models" / f"{name}-{model.revision}"
    if (target / "model_index.json").is_file():
        return target
    if not (model.source / "model_index.json").is_file():
        raise UsageError(
            f"the package has no weights for {name} in {model.source}; reinstall asyncvid or run "
            "`python -m asyncvid.training all`"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Copy into a private folder and rename, so concurrent ranks never load a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        shutil.copytree(model.source, tmp, dirs_exist_ok=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise  # a real failure, not another process winning the race
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
