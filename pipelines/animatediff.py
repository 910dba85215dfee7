"""Text-to-video with AnimateDiff (`AnimateDiffPipeline`, `UNetMotionModel`): loading and calling."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTokenizer

from asyncvid.asyncdiff.weights import load_owned
from asyncvid.errors import UsageError
from asyncvid.models.sources import adapter_variant, check_weights, takes, variant_of
from asyncvid.models.variants import forms, weight_files
from asyncvid.models.weights import skeleton
from asyncvid.pipelines import animatediff_parataa
from asyncvid.pipelines import initial_noise as noise
from asyncvid.requests import TextToVideo, UsageWarning

TASK = "text-to-video"
FRAME_DIM = 2  # latents are (batch, channels, frames, height, width)
DEFAULT_FRAMES = 16  # AnimateDiff's own default
DECODE_CHUNK = 16  # AnimateDiffPipeline's default decode_chunk_size


PIPELINE = AnimateDiffPipeline
COMPONENTS = takes(PIPELINE)


def load(folder: Path, *, dtype: torch.dtype, motion_adapter: Path | None = None, unet=None,
         allow_pickle: bool = False, variant: str | None = None) -> AnimateDiffPipeline:
    """An AnimateDiff pipeline from its own folder, or from a Stable Diffusion base folder plus a motion adapter.

    With `unet` (a UNetMotionModel from `unet_skeleton`, filled), that UNet is used and no motion adapter is loaded.
    A motion adapter's UNet is assembled on the meta device and filled tensor by tensor from the base UNet's and the
    adapter's files, so neither the base UNet nor the adapter is ever held beside it. Safetensors only unless
    `allow_pickle`, in the form `variant` chooses; never runs code from the folder.
    """
    base_class = _base_class(folder)
    if unet is None and motion_adapter is None and base_class != "AnimateDiffPipeline":
        raise UsageError(
            f"'{folder}' is a {base_class} base model; add --motion-adapter with an AnimateDiff motion adapter folder"
        )
    opts = dict(dtype=dtype, use_safetensors=None if allow_pickle else True, trust_remote_code=False,
                variant=variant_of(folder, COMPONENTS, variant).variant)
    if unet is None and motion_adapter is not None:
        if not _safetensors(folder / "unet", motion_adapter):
            return _load_pickles(folder, motion_adapter, base_class, opts, allow_pickle)
        unet = unet_skeleton(folder, motion_adapter)
        load_owned(unet, unet_weights(folder, motion_adapter, variant), None, device="cpu", dtype=dtype)
    if unet is None:
        return AnimateDiffPipeline.from_pretrained(folder, **opts)
    pipe = AnimateDiffPipeline.from_pretrained(folder, unet=unet, motion_adapter=None, **opts)
    return _video_scheduler(pipe) if base_class != "AnimateDiffPipeline" else pipe


def _video_scheduler(pipe: AnimateDiffPipeline) -> AnimateDiffPipeline:
    """A Stable Diffusion folder brings its image scheduler; AnimateDiff samples with DDIM, linear betas."""
    pipe.scheduler = DDIMScheduler.from_config(
        pipe.scheduler.config, beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1
    )
    return pipe


def _safetensors(*folders: Path) -> bool:
    return all(forms(f) for f in folders)


def _load_pickles(folder: Path, motion_adapter: Path, base_class: str, opts: dict,
                  allow_pickle: bool) -> AnimateDiffPipeline:
    """Pickle weights (--allow-pickle) cannot be read tensor by tensor: diffusers loads and merges them whole."""
    check_weights(motion_adapter, allow_pickle=allow_pickle)
    variant = adapter_variant(motion_adapter, opts["variant"]).variant if forms(motion_adapter) else None
    adapter = MotionAdapter.from_pretrained(motion_adapter, **{**opts, "variant": variant})
    if base_class == "AnimateDiffPipeline":
        pipe = AnimateDiffPipeline.from_pretrained(folder, **opts)
        pipe.unet.load_motion_modules(adapter)
    else:
        pipe = _video_scheduler(AnimateDiffPipeline.from_pretrained(folder, motion_adapter=adapter, **opts))
    pipe.register_modules(motion_adapter=None)  # merged into the UNet: the copy would only hold memory
    return pipe


def unet_skeleton(folder: Path, motion_adapter: Path | None = None) -> torch.nn.Module:
    """The UNetMotionModel with empty weights, as AnimateDiffPipeline assembles it (no file but configs is read):
    the folder's own, or a Stable Diffusion UNet's merged with a motion adapter (UNetMotionModel.from_unet2d)."""
    if motion_adapter is not None:
        _refuse_own_conv_in(motion_adapter)
    if _base_class(folder) == "AnimateDiffPipeline":
        return skeleton(UNetMotionModel, folder / "unet")  # an extra adapter's motion modules carry the same names
    if motion_adapter is None:
        raise UsageError(f"'{folder}' is a {_base_class(folder)} base model; add --motion-adapter with an "
                         f"AnimateDiff motion adapter folder")
    with init_empty_weights(include_buffers=False):
        base = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet"))
        adapter = MotionAdapter.from_config(MotionAdapter.load_config(motion_adapter))
        return UNetMotionModel.from_unet2d(base, adapter, load_weights=False).eval()


def _refuse_own_conv_in(motion_adapter: Path) -> None:
    channels = MotionAdapter.load_config(motion_adapter).get("conv_in_channels")
    if channels:
        raise UsageError(f"motion adapter '{motion_adapter}' brings its own conv_in (a PIA-style adapter, "
                         f"conv_in_channels={channels}); asyncvid supports AnimateDiff motion adapters without one")


def unet_weights(folder: Path, motion_adapter: Path | None = None, variant: str | None = None) -> list[Path]:
    """The safetensors files that fill `unet_skeleton`: the folder's UNet, then the adapter's (the UNetMotionModel's
    tensors are the base UNet's and the adapter's under the same names)."""
    files = weight_files(folder / "unet", variant_of(folder, COMPONENTS, variant).variant)
    if motion_adapter is not None:
        files += weight_files(motion_adapter, adapter_variant(motion_adapter, variant).variant)
    return files


def _base_class(folder: Path) -> str:
    return json.loads((folder / "model_index.json").read_text())["_class_name"]


def check_folder(folder: Path, requests: list[TextToVideo], motion_adapter: Path | None = None) -> None:
    """What `check` checks, from the configs and the tokenizer, before any weights load or any process starts."""
    config = (motion_adapter or folder / "unet") / "config.json"
    limit = json.loads(config.read_text()).get("motion_max_seq_length") if config.is_file() else None
    for request in requests:
        _check_frames(request, limit)
    if (folder / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        for request in requests:
            _warn_if_truncated(tokenizer, request)


def check(pipe: AnimateDiffPipeline, request: TextToVideo) -> None:
    """Limits that depend on the loaded model; a prompt past the text encoder's length is a warning, not an error."""
    _check_frames(request, pipe.unet.config.get("motion_max_seq_length", None))
    # In a process group, the process that started it has checked the prompts (asyncvid.pipelines.preflight).
    if not torch.distributed.is_initialized():
        _warn_if_truncated(pipe.tokenizer, request)


def _check_frames(request: TextToVideo, limit: int | None) -> None:
    frames = request.num_frames or DEFAULT_FRAMES
    if limit is not None and frames > limit:
        raise UsageError(f"frames {frames} exceed this motion adapter's limit of {limit}; use --frames {limit} or fewer")


def _warn_if_truncated(tokenizer, request: TextToVideo) -> None:
    """The pipeline cuts prompts at the tokenizer's length and says so only in a log line that asyncvid hides."""
    limit = tokenizer.model_max_length
    for what, text in (("prompt", request.prompt), ("negative prompt", request.negative_prompt)):
        ids = tokenizer(text, truncation=False, verbose=False).input_ids if text else []
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1 : limit - 1], skip_special_tokens=True).split()  # between BOS and EOS
        head = text if len(text) <= 40 else text[:40] + "..."
        # One place and the same text: Python shows it once per process, however many checks find it.
        warnings.warn(UsageWarning(
            f"{what} '{head}' is {len(ids)} tokens but the text encoder reads {limit}: everything after "
            f"'{' '.join(kept[-3:])}' is ignored; shorten it"
        ), stacklevel=1)


def initial_noise(pipe: AnimateDiffPipeline, request: TextToVideo, generator) -> torch.Tensor | None:
    """The request's initial latents (before the scheduler's scaling) with `shared_noise`, `noise_mean` and
    `shared_grid`; None (the pipeline draws its own) with none of them. Drawn first from `generator`, where the
    pipeline draws its own."""
    frames = request.num_frames or DEFAULT_FRAMES
    height = request.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = request.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (1, pipe.unet.config.in_channels, frames, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    return noise.initial_noise(shape, frame_dim=FRAME_DIM, share=request.shared_noise, mean=request.noise_mean,
                               grid=request.shared_grid, generator=generator, device=pipe._execution_device,
                               dtype=pipe.text_encoder.dtype)


def call(pipe: AnimateDiffPipeline, request: TextToVideo, *, generator, callback, output_type: str = "np"):
    """Run the pipeline's own sampling loop; returns float frames (F, H, W, 3) in [0, 1], or the latents."""
    out = pipe(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt or None,
        num_frames=request.num_frames or DEFAULT_FRAMES,
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        generator=generator,
        latents=initial_noise(pipe, request, generator),
        output_type=output_type,
        callback_on_step_end=callback,
    )
    return out.frames[0] if output_type == "np" else out.frames


def decode_chunk(pipe: AnimateDiffPipeline, request: TextToVideo, num_frames: int) -> int:
    """The pipeline decodes DECODE_CHUNK frames per VAE batch; splitting elsewhere changes the batch size, and CPU
    kernels may round differently at another batch size, so ranks split only between the pipeline's chunks."""
    return DECODE_CHUNK


def decode(pipe: AnimateDiffPipeline, latents, request: TextToVideo, start: int, stop: int) -> np.ndarray:
    """Frames [start, stop) of latents (B, C, F, H, W), decoded and post-processed as the pipeline does."""
    video = pipe.decode_latents(latents[:, :, start:stop], DECODE_CHUNK)
    return pipe.video_processor.postprocess_video(video=video, output_type="np")[0]


def parataa_problem(pipe: AnimateDiffPipeline, request: TextToVideo, *, generator, eta: float = 0.0):
    """ParaTAA's view of the request (asyncvid.parataa.problem.Problem), prepared as the pipeline prepares it."""
    return animatediff_parataa.prepare(pipe, request, frames=request.num_frames or DEFAULT_FRAMES, generator=generator,
                                       eta=eta, latents=initial_noise(pipe, request, generator))
