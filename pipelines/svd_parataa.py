"""ParaTAA's problem for Stable Video Diffusion: the pipeline's own image conditioning and latents, the UNet as rows."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from asyncvid.parataa.problem import Problem
from asyncvid.parataa.trajectory import from_scheduler
from asyncvid.requests import ImageToVideo


def prepare(pipe, request: ImageToVideo, *, image, generator: torch.Generator, eta: float = 0.0,
            latents: torch.Tensor | None = None) -> Problem:
    """Mirror `StableVideoDiffusionPipeline.__call__` up to its denoising loop, drawing noise in the same order;
    `latents`: the initial noise given to the pipeline (`pipelines/svd.initial_noise`), else drawn as it draws it."""
    height = request.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = request.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    frames = request.num_frames if request.num_frames is not None else pipe.unet.config.num_frames
    low = request.min_guidance_scale
    high = low if frames == 1 else request.max_guidance_scale  # as adapters.svd.call: one frame gets `min`
    guided = high > 1
    device = pipe._execution_device
    embeds = pipe._encode_image(image, device, 1, guided)
    pixels = pipe.video_processor.preprocess(image, height=height, width=width).to(device)
    pixels = pixels + request.noise_aug_strength * randn_tensor(pixels.shape, generator=generator, device=device,
                                                                dtype=pixels.dtype)
    upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
    if upcast:
        pipe.vae.to(dtype=torch.float32)
    image_latents = pipe._encode_vae_image(pixels, device=device, num_videos_per_prompt=1,
                                           do_classifier_free_guidance=guided).to(embeds.dtype)
    if upcast:
        pipe.vae.to(dtype=torch.float16)
    image_latents = image_latents.unsqueeze(1).repeat(1, frames, 1, 1, 1)
    time_ids = pipe._get_add_time_ids(request.fps - 1, request.motion_bucket_id, request.noise_aug_strength,
                                      embeds.dtype, 1, 1, guided).to(device)
    trajectory = from_scheduler(pipe.scheduler, request.num_inference_steps, eta=eta, device=device)
    latents = pipe.prepare_latents(1, frames, pipe.unet.config.in_channels, height, width, embeds.dtype, device,
                                   generator, latents)
    scale_per_frame = torch.linspace(low, high, frames, device=device, dtype=latents.dtype).view(1, -1, 1, 1, 1)
    timesteps, scale = trajectory.timesteps.to(device), trajectory.input_scale.to(device)

    def model(x: torch.Tensor, steps: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        branch = branch.to(device)
        rows = (x * scale[steps].view(-1, 1, 1, 1, 1)).to(pipe.unet.dtype)
        rows = torch.cat([rows, image_latents[branch]], dim=2)
        return pipe.unet(rows, timesteps[steps.to(device)], encoder_hidden_states=embeds[branch],
                         added_time_ids=time_ids[branch], return_dict=False)[0]

    def combine(out: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return out[0] + scale_per_frame * (out[1] - out[0]) if guided else out[0]

    return Problem(latents[0], trajectory, 2 if guided else 1, model, combine, pipe.unet.dtype)
