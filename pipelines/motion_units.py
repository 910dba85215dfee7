"""`UNetMotionModel` (AnimateDiff) as a unit program, mirroring diffusers 0.42's forward."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_motion_model import UNetMotionOutput

from asyncvid.asyncdiff.units import Program, Unit
from asyncvid.errors import UsageError
from asyncvid.pipelines.unit_common import check_upsample_size, downsample, timestep_tensor, upsample

# conv_in is tiny and holds the first parameter, which diffusers reads for the model's device and dtype.
FRAME_DIM = 2  # the UNet's sample is (batch, channels, frames, height, width)
SHARED = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding")


@dataclass
class Context:
    emb: torch.Tensor
    encoder_hidden_states: torch.Tensor
    attention_mask: torch.Tensor | None
    cross_attention_kwargs: dict | None
    num_frames: int


def build_program(unet) -> Program:
    """conv_in, per layer resnet -> attention -> motion module, samplers, the mid block, up blocks, conv_out."""
    if getattr(unet, "encoder_hid_proj", None) is not None and unet.config.encoder_hid_dim_type == "ip_image_proj":
        raise UsageError("IP-Adapter image embeddings are not supported with parallel sampling; unload the IP-Adapter")
    units = [Unit("conv_in", lambda c, h, s: unet.conv_in(h), pushes=True)]
    for i, block in enumerate(unet.down_blocks):
        units += _layers(f"down_blocks.{i}", block, up=False)
        if block.downsamplers is not None:
            units.append(Unit(f"down_blocks.{i}.downsamplers.0", downsample(block.downsamplers), pushes=True))
    if unet.mid_block is not None:
        mid = unet.mid_block
        units.append(Unit("mid_block.resnets.0", _resnet(mid.resnets[0])))
        motions = getattr(mid, "motion_modules", None)
        for j, (attn, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
            units.append(Unit(f"mid_block.attentions.{j}", _attention(attn)))
            if motions is not None:
                units.append(Unit(f"mid_block.motion_modules.{j}", _motion(motions[j])))
            units.append(Unit(f"mid_block.resnets.{j + 1}", _resnet(resnet)))
    for i, block in enumerate(unet.up_blocks):
        if getattr(block, "s1", None) is not None:
            raise UsageError("FreeU is enabled on this UNet; disable it (pipe.disable_freeu()) for parallel sampling")
        units += _layers(f"up_blocks.{i}", block, up=True)
        if block.upsamplers is not None:
            units.append(Unit(f"up_blocks.{i}.upsamplers.0", upsample(block.upsamplers, keyword=True)))
    norm = ("conv_norm_out",) if unet.conv_norm_out is not None else ()
    units.append(Unit("conv_out", _conv_out(unet), modules=norm + ("conv_out",)))
    return Program(tuple(units), SHARED, lambda *a, **k: _prologue(unet, *a, **k), UNetMotionOutput)


def _layers(prefix: str, block, up: bool) -> list[Unit]:
    """resnet (taking a skip on the way up), cross-attention if any, motion module; a skip after each layer down."""
    attentions = getattr(block, "attentions", None)
    units = []
    for j, resnet in enumerate(block.resnets):
        layer = [Unit(f"{prefix}.resnets.{j}", _resnet(resnet, concat=up), pops=up)]
        if attentions is not None:
            layer.append(Unit(f"{prefix}.attentions.{j}", _attention(attentions[j])))
        layer.append(Unit(f"{prefix}.motion_modules.{j}", _motion(block.motion_modules[j])))
        if not up:
            last = layer[-1]
            layer[-1] = Unit(last.name, last.run, pushes=True)
        units += layer
    return units


def _resnet(resnet, concat=False):
    def run(c, h, skip):
        if concat:
            h = torch.cat([h, skip], dim=1)
        return resnet(input_tensor=h, temb=c.emb)
    return run


def _attention(attn):
    return lambda c, h, s: attn(
        hidden_states=h, encoder_hidden_states=c.encoder_hidden_states,
        cross_attention_kwargs=c.cross_attention_kwargs, attention_mask=c.attention_mask,
        encoder_attention_mask=None, return_dict=False,
    )[0]


def _motion(module):
    return lambda c, h, s: module(h, num_frames=c.num_frames)


def _conv_out(unet):
    def run(c, h, s):
        if unet.conv_norm_out:
            h = unet.conv_act(unet.conv_norm_out(h))
        h = unet.conv_out(h)
        return h[None, :].reshape((-1, c.num_frames) + h.shape[1:]).permute(0, 2, 1, 3, 4)
    return run


def _prologue(unet, sample, timestep, encoder_hidden_states, timestep_cond=None, attention_mask=None,
              cross_attention_kwargs=None, added_cond_kwargs=None, down_block_additional_residuals=None,
              mid_block_additional_residual=None, return_dict=True):
    """Steps 1 (time embeddings) and 2 (frames into the batch) of the UNet's forward."""
    if down_block_additional_residuals is not None or mid_block_additional_residual is not None:
        raise UsageError("ControlNet residuals are not supported with parallel sampling; run without a ControlNet")
    check_upsample_size(unet, sample)
    if attention_mask is not None:
        attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
    num_frames = sample.shape[2]
    timesteps = timestep_tensor(timestep, sample, sample.shape[0])
    emb = unet.time_embedding(unet.time_proj(timesteps).to(dtype=unet.dtype), timestep_cond)
    if unet.config.addition_embed_type == "text_time":
        text_embeds = added_cond_kwargs["text_embeds"]
        time_embeds = unet.add_time_proj(added_cond_kwargs["time_ids"].flatten())
        time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
        emb = emb + unet.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
    emb = emb.repeat_interleave(num_frames, dim=0, output_size=emb.shape[0] * num_frames)
    sample = sample.permute(0, 2, 1, 3, 4).reshape((sample.shape[0] * num_frames, -1) + sample.shape[3:])
    ctx = Context(emb, encoder_hidden_states, attention_mask, cross_attention_kwargs, num_frames)
    return ctx, sample


def example_inputs(unet, *, frames: int | None = None, height: int | None = None, width: int | None = None,
                   batch: int = 2, scale: int = 8):
    """UNet inputs as AnimateDiff's pipeline builds them (a guidance batch of 2, 77 text tokens per frame)."""
    frames = frames or 16
    h = (height or unet.config.sample_size * scale) // scale  # `scale`: the VAE's factor
    w = (width or unet.config.sample_size * scale) // scale
    sample = torch.randn(batch, unet.config.in_channels, frames, h, w)
    text = torch.randn(batch * frames, 77, unet.config.cross_attention_dim)
    return (sample, torch.tensor(501), text), {}
