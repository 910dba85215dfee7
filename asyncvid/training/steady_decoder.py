"""A trained frame VAE's decoder fine-tuned to draw a clip's background at one brightness in every frame (round 43).

The frame VAE decodes each frame alone, and its group norms and mid-block attention see the whole frame, so the
background it draws brightens and darkens as the object moves: on tiny-svd r6's mid-grey backgrounds its round trip
alone steps by 1.5 levels from frame to frame (docs/MODELS.md, round 42), half of what sampled clips show there.
Each step here decodes whole training clips and charges, beside the object-weighted reconstruction, each frame's
background brightness error minus its clip's mean: the frame-to-frame change the evaluator reads as flicker, not the
constant offset a background tone may keep. The encoder is frozen, so the latents a UNet drew in are the same.
"""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from asyncvid.eval.clips import HELDOUT_IMAGE_SEED, heldout_images, render
from asyncvid.eval.temporal import read_consistency
from asyncvid.training.data import clip_set, object_weight, pick
from asyncvid.training.loop import TrainConfig, finish, train

DECODER = ("decoder.", "post_quant_conv.")  # the parameters trained; the encoder keeps the UNet's latents


def steady_decoder_loss_fn(vae, *, steadiness: float, latent_noise: float, clips_per_caption: int = 8,
                           num_frames: int = 8, seed: int = 0):
    """The loss of a decoder fine-tune: per step `batch` whole training clips decoded from their latent means plus
    `latent_noise` (up to that many standard deviations, drawn per clip); object-weighted MSE + L1, plus
    `steadiness` x the squared change of each frame's background brightness error from its clip's mean, over the
    pixels no frame's object covers (as asyncvid.eval.temporal reads flicker)."""
    _, pool = clip_set(clips_per_caption, num_frames, seed)
    with torch.no_grad():  # the encoder is frozen: each clip's latents once
        latents = torch.stack([vae.encode(clip).latent_dist.mean for clip in pool])
    scale = float(latents.std())
    background = (object_weight(pool) == 1).all(dim=1, keepdim=True).float()  # (clips, 1, 1, H, W)

    def loss(model, batch, generator):
        idx = pick(len(pool), batch, generator)
        x, z = pool[idx], latents[idx]
        noise = latent_noise * scale * torch.rand(batch, 1, 1, 1, 1, generator=generator)
        recon = model.decode((z + noise * torch.randn(z.shape, generator=generator)).flatten(0, 1)).sample
        err = recon.unflatten(0, x.shape[:2]) - x
        w = object_weight(x)
        total = (w * err.square()).mean() + (w * err.abs()).mean()
        return total + steadiness * unsteadiness(err, background[idx])

    return loss


def unsteadiness(err: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """Mean square of each frame's background brightness error (channels' mean over the `background` pixels) off
    its clip's mean: err (clips, frames, 3, H, W), background (clips, 1, 1, H, W) of 0 and 1."""
    brightness = (err.mean(dim=2, keepdim=True) * background).sum((2, 3, 4)) / background.sum((2, 3, 4)).clamp(min=1)
    return (brightness - brightness.mean(dim=1, keepdim=True)).square().mean()


@torch.no_grad()
def round_trip_flicker(vae, *, num_frames: int = 8) -> float:
    """Median over the held-out images' clips (asyncvid.eval.clips.heldout_images, at their images' seeds) of the
    largest frame-to-frame background brightness step of their round trip (latent means), in levels of 255."""
    flicker = []
    for i, (caption, tone) in enumerate(heldout_images()):
        frames = render(caption, HELDOUT_IMAGE_SEED + i, num_frames, tone)
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        flicker.append(read_consistency(((decoded + 1) / 2).permute(0, 2, 3, 1).numpy()).flicker)
    return float(statistics.median(flicker))


def fine_tune_decoder(init_from: Path, dest: Path, config: TrainConfig, *, clips: int = 8, **weights) -> dict:
    """Fine-tune the decoder of the pipeline folder `init_from`'s VAE on `steady_decoder_loss_fn(**weights)` and
    write the folder again at `dest` with that VAE, in float16 as export ships weights; returns the log."""
    model = AutoencoderKL.from_pretrained(init_from / "vae", torch_dtype=torch.float32)
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(DECODER))
    before = round_trip_flicker(model)
    loss = steady_decoder_loss_fn(model, clips_per_caption=clips, seed=config.seed, **weights)
    log = train(model, loss, config, name="vae-steady")
    log.update(init_from=str(init_from), **weights,
               round_trip_flicker={"before": round(before, 2), "after": round(round_trip_flicker(model), 2)})
    finish(model, config, log)
    if log["steps"] == config.steps:
        shutil.copytree(init_from, dest, ignore=shutil.ignore_patterns("vae"))
        model.to(torch.float16).save_pretrained(dest / "vae")
    return log
