"""SVD's UNetSpatioTemporalConditionModel on cached latents: EDM training with v-prediction (sigma_data 1), the
preconditioning the pipeline's Euler scheduler undoes, conditioned on the first frame the way the pipeline is."""

from __future__ import annotations

import math

import torch
from PIL import Image

from asyncvid.training.data import cache_name, cached, clip_set, encode_frames, object_mask, pick

CONDITION_DROPOUT = 0.1
P_MEAN, P_STD = 0.7, 1.6  # SVD's log-normal training sigmas
UNIFORM_SHARE = 0.2  # and a fifth log-uniform over the sampler's whole range, so the first steps are trained too
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0


def svd_loss_fn(pipe, *, clips_per_caption: int, num_frames: int = 8, seed: int = 0, fps: int = 7,
                motion_bucket_id: int = 127, noise_aug_strength: float = 0.02, object_gain: float = 0.0,
                cache_dir=None):
    """The loss for `pipe.unet`; fps, motion bucket and noise augmentation are the CLI defaults, fed as the
    pipeline feeds them (fps - 1). `object_gain` > 0 weighs the shape's latent pixels 1 + gain times the
    background's (the shape and its edge are ~8 of 64 latent pixels, and its corners are what tells a square from a disc). With
    `cache_dir`, the encoded clips are kept there for the next run."""

    def encode():
        _, clips = clip_set(clips_per_caption, num_frames, seed)
        latents = encode_frames(pipe.vae, clips.flatten(0, 1)).unflatten(0, (len(clips), num_frames))  # (N, F, C, h, w)
        first = clips[:, 0]
        with torch.no_grad():
            images = [Image.fromarray(((f.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).byte().numpy())
                      for f in first]
            embeds = torch.cat([pipe._encode_image(images[i:i + 64], "cpu", 1, False)
                                for i in range(0, len(images), 64)])  # (clips, 1, D)
        return latents, first, embeds

    name = cache_name(pipe.vae, clips=clips_per_caption, frames=num_frames, seed=seed)
    latents, first, image_embeds = cached(cache_dir and cache_dir / name, encode)
    n = len(latents)
    # object_mask reads (N, C, F, h, w); SVD's latents are (N, F, C, h, w)
    pixel_weight = (1.0 + object_gain * object_mask(latents.transpose(1, 2)).transpose(1, 2)
                    if object_gain > 0 else None)
    time_ids = torch.tensor([[fps - 1, motion_bucket_id, noise_aug_strength]], dtype=torch.float32)

    def loss(model, batch, generator):
        pick_ = pick(n, batch, generator)
        x0 = latents[pick_]
        with torch.no_grad():
            noisy_first = first[pick_] + noise_aug_strength * torch.randn(first[pick_].shape, generator=generator)
            cond_latents = pipe.vae.encode(noisy_first).latent_dist.mode()  # unscaled, as the pipeline does
        embeds = image_embeds[pick_]
        keep = (torch.rand(batch, generator=generator) >= CONDITION_DROPOUT).float()
        cond_latents = cond_latents * keep[:, None, None, None]  # the pipeline's unconditional half is zeros
        embeds = embeds * keep[:, None, None]
        log_sigma = torch.where(
            torch.rand(batch, generator=generator) < UNIFORM_SHARE,
            torch.rand(batch, generator=generator) * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN),
            torch.randn(batch, generator=generator) * P_STD + P_MEAN,
        )
        sigma = log_sigma.exp().view(batch, 1, 1, 1, 1)
        noisy = x0 + sigma * torch.randn(x0.shape, generator=generator)
        c_in, c_skip, c_out = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
        model_in = torch.cat([noisy * c_in, cond_latents[:, None].expand(-1, num_frames, -1, -1, -1)], dim=2)
        out = model(model_in, 0.25 * log_sigma, encoder_hidden_states=embeds,
                    added_time_ids=time_ids.expand(batch, -1)).sample
        target = (x0 - c_skip * noisy) / c_out
        if pixel_weight is None:
            return torch.nn.functional.mse_loss(out, target)
        return (pixel_weight[pick_] * (out - target).square()).mean()

    return loss
