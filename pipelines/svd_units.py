"""`UNetSpatioTemporalConditionModel` (Stable Video Diffusion) as a unit program, mirroring diffusers 0.42's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_spatio_temporal_condition import UNetSpatioTemporalConditionOutput

from asyncvid.asyncdiff.units import Program, Unit
from asyncvid.pipelines.unit_common import check_upsample_size, downsample, timestep_tensor, upsample

# conv_in is tiny and holds the first parameter, which diffusers reads for the model's device and dtype.
FRAME_DIM = 1  # the UNet's sample is (batch, frames, channels, height, width)
SHARED = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding")


@dataclass
class Context:
    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor
    image_only_indicator: torch.Tensor
    batch_size: int
    num_frames: int


def build_program(unet) -> Program:
    """conv_in, each down block's resnets/attentions/downsampler, the mid block, the up blocks, conv_out."""
    units = [Unit("conv_in", lambda c, h, s: unet.conv_in(h), pushes=True)]
    for i, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            units.append(Unit(f"down_blocks.{i}.resnets.{j}", _resnet(resnet), pushes=attentions is None))
            if attentions is not None:
                units.append(Unit(f"down_blocks.{i}.attentions.{j}", _attention(attentions[j]), pushes=True))
        if block.downsamplers is not None:
            units.append(Unit(f"down_blocks.{i}.downsamplers.0", downsample(block.downsamplers), pushes=True))
    mid = unet.mid_block
    units.append(Unit("mid_block.resnets.0", _resnet(mid.resnets[0])))
    for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        units.append(Unit(f"mid_block.attentions.{j}", _attention(attn)))
        units.append(Unit(f"mid_block.resnets.{j + 1}", _resnet(resnet)))
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            units.append(Unit(f"up_blocks.{i}.resnets.{j}", _resnet(resnet, concat=True), pops=True))
            if attentions is not None:
                units.append(Unit(f"up_blocks.{i}.attentions.{j}", _attention(attentions[j])))
        if block.upsamplers is not None:
            units.append(Unit(f"up_blocks.{i}.upsamplers.0", upsample(block.upsamplers, keyword=False)))
    units.append(Unit("conv_out", _conv_out(unet), modules=("conv_norm_out", "conv_out")))
    return Program(tuple(units), SHARED, lambda *a, **k: _prologue(unet, *a, **k), UNetSpatioTemporalConditionOutput)


def _resnet(resnet, concat=False):
    def run(c, h, skip):
        if concat:
            h = torch.cat([h, skip], dim=1)
        return resnet(h, c.emb, image_only_indicator=c.image_only_indicator)
    return run


def _attention(attn):
    return lambda c, h, s: attn(
        h, encoder_hidden_states=c.encoder_hidden_states, image_only_indicator=c.image_only_indicator,
        return_dict=False,
    )[0]


def _conv_out(unet):
    def run(c, h, s):
        h = unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
        return h.reshape(c.batch_size, c.num_frames, *h.shape[1:])
    return run


def _prologue(unet, sample, timestep, encoder_hidden_states, added_time_ids, return_dict=True):
    """Step 1 (time embeddings) and the flattening before conv_in, as in the UNet's forward."""
    check_upsample_size(unet, sample)
    batch_size, num_frames = sample.shape[:2]
    timesteps = timestep_tensor(timestep, sample, batch_size)
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=sample.dtype))
    time_embeds = unet.add_time_proj(added_time_ids.flatten()).reshape((batch_size, -1)).to(emb.dtype)
    emb = emb + unet.add_embedding(time_embeds)
    sample = sample.flatten(0, 1)
    emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
    encoder_hidden_states = encoder_hidden_states.repeat_interleave(
        num_frames, dim=0, output_size=encoder_hidden_states.shape[0] * num_frames
    )
    indicator = torch.zeros(batch_size, num_frames, dtype=sample.dtype, device=sample.device)
    return Context(emb, encoder_hidden_states, indicator, batch_size, num_frames), sample


def example_inputs(unet, *, frames: int | None = None, height: int | None = None, width: int | None = None,
                   batch: int = 2, scale: int = 8):
    """UNet inputs as SVD's pipeline builds them (a guidance batch of 2), for profiling and planning."""
    frames = frames or unet.config.num_frames
    h = (height or unet.config.sample_size * scale) // scale  # `scale`: the VAE's factor
    w = (width or unet.config.sample_size * scale) // scale
    cross = unet.config.cross_attention_dim
    sample = torch.randn(batch, frames, unet.config.in_channels, h, w)
    return (sample, torch.tensor(1.0), torch.randn(batch, 1, cross), torch.randn(batch, 3)), {}
