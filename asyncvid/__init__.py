"""asyncvid: video diffusion (Stable Video Diffusion, AnimateDiff) sampled in parallel across devices.

    import asyncvid
    with asyncvid.load("tiny-svd", devices=2, sampler=asyncvid.AsyncDiffConfig(stages=2)) as pipe:
        video = pipe.image_to_video("photo.png", num_inference_steps=10, seed=0)
"""

__version__ = "0.1.0"

# Imported on first use, so that `asyncvid --version` and the CLI's argument checks do not load torch.
_LAZY = {
    "load": "asyncvid.api",
    "parallelize": "asyncvid.own_pipeline",
    "Parallelized": "asyncvid.own_pipeline",
    "VideoPipeline": "asyncvid.api",
    "Video": "asyncvid.video.frames",
    "AsyncDiffConfig": "asyncvid.asyncdiff.config",
    "ParaTAAConfig": "asyncvid.parataa.config",
    "RankFailed": "asyncvid.runtime.pool",
    "RequestFailed": "asyncvid.runtime.pool",
    "UsageError": "asyncvid.errors",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'asyncvid' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)  # the lazy names too, for tab completion
