"""Pieces both UNet unit programs share: the timestep tensor and the sampler units."""

from __future__ import annotations

import torch
from diffusers.utils.torch_utils import maybe_adjust_dtype_for_device

from asyncvid.errors import UsageError


def timestep_tensor(timestep, sample: torch.Tensor, batch: int) -> torch.Tensor:
    """The UNets' own timestep handling: a tensor on the sample's device, broadcast to the batch."""
    if not torch.is_tensor(timestep):
        dtype = torch.float64 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=maybe_adjust_dtype_for_device(dtype, sample.device),
                                device=sample.device)
    elif len(timestep.shape) == 0:
        timestep = timestep[None].to(sample.device)
    return timestep.expand(batch)


def check_upsample_size(unet, sample: torch.Tensor) -> None:
    """Staged runs need latents divisible by the up factor: the forced upsample size would cross stages."""
    factor = 2 ** unet.num_upsamplers
    if any(s % factor for s in sample.shape[-2:]):
        raise UsageError(
            f"latent size {tuple(sample.shape[-2:])} is not divisible by {factor}; for parallel sampling use a "
            f"height and width divisible by {factor * 8}"
        )


def downsample(samplers, **kwargs):
    def run(c, h, s):
        for sampler in samplers:
            h = sampler(h, **kwargs) if kwargs else sampler(h)
        return h
    return run


def upsample(samplers, keyword: bool):
    def run(c, h, s):
        for sampler in samplers:
            h = sampler(hidden_states=h, output_size=None) if keyword else sampler(h, None)
        return h
    return run
