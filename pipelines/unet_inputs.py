"""How each pipeline family calls its UNet, as example inputs: what asyncvid traces, plans and times the UNet on.
The forward itself is always the UNet's own (asyncvid.asyncdiff.trace)."""

from __future__ import annotations

import torch

from asyncvid.asyncdiff.family import Family


def svd_inputs(unet, *, frames: int | None = None, height: int | None = None, width: int | None = None,
               batch: int = 2, scale: int = 8):
    """UNet inputs as SVD's pipeline builds them (a guidance batch of 2): sample (batch, frames, channels, h, w)."""
    frames = frames or unet.config.num_frames
    h = (height or unet.config.sample_size * scale) // scale  # `scale`: the VAE's factor
    w = (width or unet.config.sample_size * scale) // scale
    cross = unet.config.cross_attention_dim
    sample = torch.randn(batch, frames, unet.config.in_channels, h, w)
    return (sample, torch.tensor(1.0), torch.randn(batch, 1, cross), torch.randn(batch, 3)), {}


def motion_inputs(unet, *, frames: int | None = None, height: int | None = None, width: int | None = None,
                  batch: int = 2, scale: int = 8):
    """UNet inputs as AnimateDiff's pipelines build them (a guidance batch of 2, 77 text tokens per frame; SDXL's
    pooled text and size conditioning where the UNet takes them): sample (batch, channels, frames, h, w)."""
    frames = frames or 16
    h = (height or unet.config.sample_size * scale) // scale  # `scale`: the VAE's factor
    w = (width or unet.config.sample_size * scale) // scale
    sample = torch.randn(batch, unet.config.in_channels, frames, h, w)
    text = torch.randn(batch * frames, 77, unet.config.cross_attention_dim)
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        time_ids = 6 * unet.config.addition_time_embed_dim
        pooled = unet.config.projection_class_embeddings_input_dim - time_ids
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
    return (sample, torch.tensor(501), text), kwargs


SVD = Family("svd", frame_dim=1, inputs=svd_inputs)
MOTION = Family("animatediff", frame_dim=2, inputs=motion_inputs)
