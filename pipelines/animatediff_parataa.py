"""ParaTAA's problem for AnimateDiff: the pipeline's own prompt encoding and initial latents, and the UNet as rows."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import randn_tensor

from asyncvid.parataa.problem import Problem
from asyncvid.parataa.trajectory import from_scheduler
from asyncvid.requests import TextToVideo


def prepare(pipe, request: TextToVideo, *, frames: int, generator: torch.Generator, eta: float = 0.0,
            latents: torch.Tensor | None = None) -> Problem:
    """Mirror `AnimateDiffPipeline.__call__` up to its denoising loop (steps 3-5), drawing noise in the same order;
    `latents` are the initial ones the pipeline is given (else it draws them)."""
    height = request.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    width = request.width or pipe.unet.config.sample_size * pipe.vae_scale_factor
    device, guidance = pipe._execution_device, request.guidance_scale
    guided = guidance > 1
    positive, negative = pipe.encode_prompt(request.prompt, device, 1, guided, request.negative_prompt or None)
    # One embedding per frame, as the pipeline repeats them; branch 0 is unconditional, as in its batch.
    embeds = torch.stack([negative, positive] if guided else [positive]).repeat_interleave(frames, dim=1)
    trajectory = from_scheduler(pipe.scheduler, request.num_inference_steps, eta=eta, device=device)
    latents = pipe.prepare_latents(1, pipe.unet.config.in_channels, frames, height, width, positive.dtype, device,
                                   generator, latents)
    noise = None
    if trajectory.stochastic:
        noise = randn_tensor((trajectory.steps, *latents.shape[1:]), generator=generator, device=device,
                             dtype=latents.dtype)
    timesteps, scale = trajectory.timesteps.to(device), trajectory.input_scale.to(device)

    def model(x: torch.Tensor, steps: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        rows = (x * scale[steps].view(-1, 1, 1, 1, 1)).to(pipe.unet.dtype)
        context = embeds[branch.to(device)].flatten(0, 1)  # (rows x frames, tokens, width)
        return pipe.unet(rows, timesteps[steps.to(device)], encoder_hidden_states=context).sample

    def combine(out: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return out[0] + guidance * (out[1] - out[0]) if guided else out[0]

    return Problem(latents[0], trajectory, 2 if guided else 1, model, combine, pipe.unet.dtype, noise)
