"""Text-to-video with AnimateDiff (`AnimateDiffPipeline`, `UNetMotionModel`): loading and calling."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

from asyncvid.errors import UsageError
from asyncvid.requests import TextToVideo
from asyncvid.sources import check_weights

TASK = "text-to-video"
DEFAULT_FRAMES = 16  # AnimateDiff's own default


def load(folder: Path, *, dtype: torch.dtype, motion_adapter: Path | None = None) -> AnimateDiffPipeline:
    """An AnimateDiff pipeline from its own folder, or from a Stable Diffusion base folder plus a motion adapter."""
    opts = dict(dtype=dtype, use_safetensors=True)
    base_class = json.loads((folder / "model_index.json").read_text())["_class_name"]
    adapter = None
    if motion_adapter is not None:
        check_weights(motion_adapter)
        adapter = MotionAdapter.from_pretrained(motion_adapter, **opts)
    elif base_class != "AnimateDiffPipeline":
        raise UsageError(
            f"'{folder}' is a {base_class} base model; add --motion-adapter with an AnimateDiff motion adapter folder"
        )
    if base_class == "AnimateDiffPipeline":
        pipe = AnimateDiffPipeline.from_pretrained(folder, **opts)
        if adapter is not None:
            pipe.unet.load_motion_modules(adapter)
        return pipe
    pipe = AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter, **opts)
    # A Stable Diffusion folder brings its image scheduler; AnimateDiff samples with DDIM, linear betas.
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1
    )
    return pipe


def check(pipe: AnimateDiffPipeline, request: TextToVideo) -> None:
    """Limits that depend on the loaded model."""
    limit = pipe.unet.config.get("motion_max_seq_length", None)
    frames = request.num_frames or DEFAULT_FRAMES
    if limit is not None and frames > limit:
        raise UsageError(f"frames {frames} exceed this motion adapter's limit of {limit}; use --frames {limit} or fewer")


def call(pipe: AnimateDiffPipeline, request: TextToVideo, *, generator, callback) -> np.ndarray:
    """Run the pipeline's own sampling loop; returns float frames (F, H, W, 3) in [0, 1]."""
    out = pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_frames=request.num_frames or DEFAULT_FRAMES,
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
        output_type="np",
        callback_on_step_end=callback,
    )
    return out.frames[0]
