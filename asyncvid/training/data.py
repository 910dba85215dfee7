"""Procedural clips as tensors, and the same clips encoded once by a trained VAE (the UNets train on latents)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from asyncvid.eval.clips import VERSION, Caption, render, training_captions
from asyncvid.eval.masks import as_uint8, object_masks


def clip_tensor(caption: Caption, seed: int, num_frames: int, background: int | None = None) -> torch.Tensor:
    """One clip as (frames, 3, 64, 64) floats in [-1, 1], the VAEs' input range; `background` forces a plain tone."""
    frames = torch.from_numpy(render(caption, seed, num_frames, background)).float()
    return frames.permute(0, 3, 1, 2) / 127.5 - 1.0


def clip_set(clips_per_caption: int, num_frames: int, seed: int,
             background: int | None = None) -> tuple[list[Caption], torch.Tensor]:
    """Training captions x seeds: the captions (one per clip) and (clips, frames, 3, 64, 64); `background` puts every
    clip on that plain tone (an index into BACKGROUNDS), the rest of each clip drawn as without it."""
    captions = [c for c in training_captions() for _ in range(clips_per_caption)]
    seeds = [seed * 1_000_003 + i for i in range(len(captions))]
    return captions, torch.stack([clip_tensor(c, s, num_frames, background) for c, s in zip(captions, seeds)])


def variant_set(render, n: int, seed: int, background: int | None = None) -> tuple[list[str], torch.Tensor]:
    """`n` frame geometries, each drawn once per shape or colour by `render` (asyncvid.eval.clips.render_shapes or
    render_colours), on the plain tone `background` if given: the word each geometry keeps, and
    (n, variants, 3, 64, 64) floats in [-1, 1]."""
    kept, frames = zip(*(render(seed * 1_000_003 + i, background) for i in range(n)))
    return list(kept), torch.from_numpy(np.stack(frames)).float().permute(0, 1, 4, 2, 3) / 127.5 - 1.0


def object_weight(images: torch.Tensor, gain: float = 9.0) -> torch.Tensor:
    """Per-pixel loss weight 1 + gain on the object: the shape covers ~5% of a frame but carries what is scored."""
    border = torch.cat([images[..., 0, :], images[..., -1, :], images[..., :, 0], images[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    far = (images - background).abs().amax(dim=-3, keepdim=True) > 0.15
    return 1.0 + gain * far.float()


def object_mask(latents: torch.Tensor, threshold: float = 1.0) -> torch.Tensor:
    """(N, 1, F, h, w) 1 where a latent pixel differs from its frame's background (the median of the border) by more
    than `threshold` in some channel (latents have unit standard deviation)."""
    border = torch.cat([latents[..., 0, :], latents[..., -1, :], latents[..., :, 0], latents[..., :, -1]], dim=-1)
    background = border.median(dim=-1).values[..., None, None]
    return ((latents - background).abs().amax(dim=1, keepdim=True) > threshold).float()


@torch.no_grad()
def encode_frames(vae, frames: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Latent means of (N, 3, 64, 64) frames, scaled by the VAE's scaling factor, in chunks."""
    out = [vae.encode(frames[i:i + chunk]).latent_dist.mean for i in range(0, len(frames), chunk)]
    return torch.cat(out) * vae.config.scaling_factor


def brightness_readout(vae, latents: torch.Tensor, background: torch.Tensor | None = None,
                       chunk: int = 4) -> torch.Tensor:
    """Unit gradients of each decoded frame's background brightness with respect to its latent (scaled, as
    `encode_frames` gives), in the latents' shape (clips, C, frames, h, w): the latent direction in which the decoder
    shows a frame's error as background flicker (round 28; for the colour-wheel VAE a spatial pattern, not a channel
    mean). The background is `background` (clips, H, W), or as the evaluator reads it from the decoded clip: the
    pixels no frame's object covers (asyncvid.eval.temporal), so the object's own pixels, which move, are not read."""
    out = []
    for i in range(0, len(latents), chunk):  # whole clips, as the background is the clip's
        clips = latents[i:i + chunk]
        z = clips.transpose(1, 2).flatten(0, 1).detach().clone().requires_grad_(True)  # frames decode one by one
        with torch.enable_grad():
            frames = vae.decode(z / vae.config.scaling_factor).sample.unflatten(0, clips.transpose(1, 2).shape[:2])
            if background is None:
                pixels = ((frames.detach() + 1) / 2).clamp(0, 1).permute(0, 1, 3, 4, 2).numpy()
                masks = torch.stack([torch.from_numpy(~object_masks(as_uint8(p)).any(axis=0)) for p in pixels])
            else:
                masks = background[i:i + chunk]
            masks = torch.where(masks.flatten(1).any(1)[:, None, None], masks, True)  # no background: the frame
            weights = masks[:, None, None].float() / masks.flatten(1).sum(1)[:, None, None, None, None]
            brightness = (frames * weights).sum(dim=(3, 4)).mean(dim=2)  # (clips, frames): the channels' mean
            (grad,) = torch.autograd.grad(brightness.sum(), z)
        out.append(grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12)[:, None, None, None])
    return torch.cat(out).unflatten(0, latents.transpose(1, 2).shape[:2]).transpose(1, 2).contiguous()


def off_object(readout: torch.Tensor, latents: torch.Tensor, margin: int = 0) -> torch.Tensor:
    """`brightness_readout` kept only on the latent pixels more than `margin` from where any frame's object is
    (`object_mask`, its union over the clip's frames), each frame's rescaled to unit length: the background read
    where no frame's object reaches, so an error on the object, which moves, is never charged as flicker (round
    30: through the decoder's receptive field the whole readout holds a fifth of its energy on those pixels)."""
    reached = object_mask(latents).amax(dim=2, keepdim=True)
    if margin:
        reached = F.max_pool3d(reached, (1, 2 * margin + 1, 2 * margin + 1), stride=1, padding=(0, margin, margin))
    kept = readout * (1.0 - reached)
    return kept / kept.square().sum(dim=(1, 3, 4), keepdim=True).sqrt().clamp(min=1e-12)


def cached(path, make):
    """`make()`, stored at `path` on first use and loaded from there afterwards (encoding clips takes minutes)."""
    if path is not None and Path(path).is_file():
        return torch.load(path, weights_only=False)
    value = make()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        torch.save(value, path)
    return value


def cache_name(vae, **settings) -> str:
    """A file name naming the encoding settings, the clips' version and the VAE's weights, so a retrained VAE or a
    changed clip generator never reuses latents."""
    fingerprint = sum(float(p.detach().double().sum()) for p in vae.parameters())
    # The clip generator's version; a setting left unset (None) is not named, so caches from before it keep theirs.
    settings = {"data": VERSION, **{k: v for k, v in settings.items() if v is not None}}
    return "latents-" + "-".join(f"{k}{v}" for k, v in sorted(settings.items())) + f"-{fingerprint:.6e}.pt"


def pick(n: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random indices in [0, n)."""
    return torch.randint(0, n, (batch,), generator=generator)


__all__ = ["clip_set", "clip_tensor", "encode_frames", "np", "object_mask", "object_weight", "pick", "variant_set"]
