"""Image-to-video with Stable Video Diffusion (`StableVideoDiffusionPipeline`): loading and calling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import StableVideoDiffusionPipeline, UNetSpatioTemporalConditionModel

from asyncvid.errors import UsageError
from asyncvid.models.sources import takes, variant_of
from asyncvid.models.variants import weight_files
from asyncvid.models.weights import skeleton
from asyncvid.pipelines import initial_noise as noise
from asyncvid.pipelines import svd_parataa
from asyncvid.requests import ImageToVideo
from asyncvid.video.images import load_image

TASK = "image-to-video"
FRAME_DIM = 1  # latents are (batch, frames, channels, height, width)


PIPELINE = StableVideoDiffusionPipeline
COMPONENTS = takes(PIPELINE)


def load(folder: Path, *, dtype: torch.dtype, motion_adapter: Path | None = None, unet=None,
         allow_pickle: bool = False, variant: str | None = None):
    """An SVD pipeline from its diffusers folder (with `unet`, that UNet instead of the folder's); safetensors only
    unless `allow_pickle` (then safetensors where present, pickles elsewhere), in the form `variant` chooses
    (asyncvid.models.variants). Never runs code from the folder."""
    if motion_adapter is not None:
        raise UsageError("--motion-adapter applies to AnimateDiff models only; drop it for image-to-video")
    extra = {"unet": unet} if unet is not None else {}
    safetensors = None if allow_pickle else True  # None: safetensors where present, pickles elsewhere
    return StableVideoDiffusionPipeline.from_pretrained(folder, dtype=dtype, use_safetensors=safetensors,
                                                        variant=variant_of(folder, COMPONENTS, variant).variant,
                                                        trust_remote_code=False, **extra)


def unet_skeleton(folder: Path, motion_adapter: Path | None = None) -> torch.nn.Module:
    """The UNet with empty weights (no file but its config is read)."""
    return skeleton(UNetSpatioTemporalConditionModel, folder / "unet")


def unet_weights(folder: Path, motion_adapter: Path | None = None, variant: str | None = None) -> list[Path]:
    """The safetensors files that fill `unet_skeleton`, in the form `variant` chooses."""
    return weight_files(folder / "unet", variant_of(folder, COMPONENTS, variant).variant)


def check_folder(folder: Path, requests: list[ImageToVideo], motion_adapter: Path | None = None) -> None:
    """What can be checked before any weights load: there is no motion adapter, and every image opens."""
    if motion_adapter is not None:
        raise UsageError("--motion-adapter applies to AnimateDiff models only; drop it for image-to-video")
    for request in requests:
        load_image(request.image)


def check(pipe: StableVideoDiffusionPipeline, request: ImageToVideo) -> None:
    """Limits that depend on the loaded model (SVD has none beyond the request's own)."""


def initial_noise(pipe: StableVideoDiffusionPipeline, request: ImageToVideo, generator) -> torch.Tensor | None:
    """The request's initial latents (before the scheduler's scaling) with `shared_noise` and `noise_mean`; None
    (the pipeline draws its own) with neither. Drawn first from `generator`, before the image's noise augmentation."""
    frames = request.num_frames or pipe.unet.config.num_frames
    height = request.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = request.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    # The UNet's input is the noisy latents and the image's latents side by side: half its channels are noise.
    shape = (1, frames, pipe.unet.config.in_channels // 2, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    return noise.initial_noise(shape, frame_dim=FRAME_DIM, share=request.shared_noise, mean=request.noise_mean,
                               grid=1, generator=generator, device=pipe._execution_device,
                               dtype=pipe.image_encoder.dtype)


def call(pipe: StableVideoDiffusionPipeline, request: ImageToVideo, *, generator, callback, output_type: str = "np"):
    """Run the pipeline's own sampling loop; returns float frames (F, H, W, 3) in [0, 1], or the latents."""
    # Guidance ramps linspace(min, max, frames), so one frame gets `min`. Say so: diffusers decides whether to use
    # guidance from `max` when encoding the image and from the ramp when sampling, and fails if the two disagree.
    one_frame = request.num_frames == 1
    latents = initial_noise(pipe, request, generator)
    out = pipe(
        image=load_image(request.image),
        height=request.height or pipe.unet.config.sample_size * pipe.vae_scale_factor,
        width=request.width or pipe.unet.config.sample_size * pipe.vae_scale_factor,
        num_frames=request.num_frames,
        num_inference_steps=request.num_inference_steps,
        min_guidance_scale=request.min_guidance_scale,
        max_guidance_scale=request.min_guidance_scale if one_frame else request.max_guidance_scale,
        fps=request.fps,
        motion_bucket_id=request.motion_bucket_id,
        noise_aug_strength=request.noise_aug_strength,
        decode_chunk_size=request.decode_chunk_size,
        generator=generator,
        latents=latents,
        output_type=output_type,
        callback_on_step_end=callback,
    )
    return out.frames[0] if output_type == "np" else out.frames


def decode_chunk(pipe: StableVideoDiffusionPipeline, request: ImageToVideo, num_frames: int) -> int:
    """The temporal decoder mixes the frames of a chunk, so only whole chunks decode exactly apart."""
    return request.decode_chunk_size or num_frames


def decode(pipe: StableVideoDiffusionPipeline, latents, request: ImageToVideo, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of latents (B, F, C, H, W), decoded and post-processed as the pipeline does."""
    if pipe.vae.dtype != pipe.unet.dtype:  # the pipeline upcasts the VAE to encode; it casts back before decoding
        pipe.vae.to(dtype=pipe.unet.dtype)
    chunk = decode_chunk(pipe, request, latents.shape[1])
    frames = pipe.decode_latents(latents[:, start:stop], stop - start, chunk)
    return pipe.video_processor.postprocess_video(video=frames, output_type="np")[0]


def parataa_problem(pipe: StableVideoDiffusionPipeline, request: ImageToVideo, *, generator, eta: float = 0.0):
    """ParaTAA's view of the request (asyncvid.parataa.problem.Problem), prepared as the pipeline prepares it."""
    return svd_parataa.prepare(pipe, request, image=load_image(request.image), generator=generator, eta=eta,
                               latents=initial_noise(pipe, request, generator))
