"""SVD's UNetSpatioTemporalConditionModel on cached latents: EDM training with v-prediction (sigma_data 1), the
preconditioning the pipeline's Euler scheduler undoes, conditioned on the first frame the way the pipeline is."""

from __future__ import annotations

import math

import torch
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing
from PIL import Image

from asyncvid.pipelines.initial_noise import scaled_mean, shared_frame_noise
from asyncvid.training.data import brightness_readout, cache_name, cached, clip_set, encode_frames, object_mask, pick

CONDITION_DROPOUT = 0.1
P_MEAN, P_STD = 0.7, 1.6  # SVD's log-normal training sigmas
UNIFORM_SHARE = 0.2  # and a fifth log-uniform over the sampler's whole range, so the first steps are trained too
SIGMA_MIN, SIGMA_MAX = 0.002, 700.0
# The guidance at the last frame `export` recommends in the model folder's sampling.json (SVD's ramp rises from 1 at
# the first frame). On r4's 48 held-out images, seeds 0 / 1: colour 90% / 90% and shape 98% / 94% at SVD's 3;
# 94% / 94% and 100% / 96% at 2; at 4, 88% and 96% (seed 0); guidance mostly pulls later frames off the input's
# hue (docs/MODELS.md, round 20).
MAX_GUIDANCE = 2.0
# The initial noise `export` recommends in the folder's sampling.json: every frame on one draw, its spatial means at
# zero (pipelines/initial_noise.py), however the model trained. r5 fine-tuned at flicker gain 64 keeps 50.7 / 44.4%
# of the 144 held-out clips' backgrounds calm at seeds 0 / 1 with each frame's own noise, 75.7 / 75.0% so; trained
# on half-shared noise and sampled at 0.5, 52.8 / 37.5%, at 1, 66.0 / 63.2% (docs/MODELS.md, round 41).
SHARED_NOISE = 1.0
NOISE_MEAN = 0.0


class UNetWithImageEncoder(torch.nn.Module):
    """What SVD training optimises with `--train-image-encoder`: the UNet and the CLIP vision tower whose embedding
    conditions every frame. SVD's tower is CLIP, whose embedding tells an object's colour and shape; the tiny one is
    random, and its embedding tells the background, not the object, so later frames lose the object's colour."""

    def __init__(self, unet, image_encoder):
        super().__init__()
        self.unet, self.image_encoder = unet, image_encoder.requires_grad_(True)


def clip_pixels(frames: torch.Tensor, feature_extractor) -> torch.Tensor:
    """The CLIP tower's input for frames in [-1, 1], as the pipeline's `_encode_image` makes it from 8-bit images:
    resized to 224 with antialiasing in [-1, 1], then normalised with CLIP's mean and deviation."""
    x = ((frames + 1) * 127.5).round().clamp(0, 255) / 127.5 - 1  # the pipeline is given 8-bit images
    x = (_resize_with_antialiasing(x, (224, 224)) + 1) / 2
    mean, std = (torch.tensor(v, dtype=x.dtype).view(1, -1, 1, 1)
                 for v in (feature_extractor.image_mean, feature_extractor.image_std))
    return (x - mean) / std


def svd_loss_fn(pipe, *, clips_per_caption: int, num_frames: int = 8, seed: int = 0, fps: int = 7,
                motion_bucket_id: int = 127, noise_aug_strength: float = 0.02, object_gain: float = 0.0,
                flicker_gain: float = 0.0, brightness_gain: float = 0.0, brightness_below: float | None = None,
                shared_noise: float = 0.0, noise_mean: float = 1.0, cache_dir=None):
    """The loss for `pipe.unet`; fps, motion bucket and noise augmentation are the CLI defaults, fed as the
    pipeline feeds them (fps - 1). `object_gain` > 0 weighs the shape's latent pixels 1 + gain times the
    background's (the shape and its edge are ~8 of 64 latent pixels, and its corners are what tells a square from a disc).
    `flicker_gain` > 0 adds gain times the frames' disagreement in their mean error, as AnimateDiff's clips stage
    charges it (round 27), but in x0 terms (the v error times |c_out|, what the decoder shows; round 41).
    `brightness_gain` > 0: the same for each frame's x0 error along the direction in which the decoder shows it as the
    background's brightness (`brightness_readout` at the clip's latents, cached), weighed 1 + gain times as one of the
    C x h x w modes (AnimateDiff's round 28 term; round 42: the mid-grey backgrounds flicker most).
    `brightness_below` sigma: that term only at noise levels below it, where the sampler draws the flicker rather
    than the object's colour (AnimateDiff's round 29 bound, as a sigma); None: at every one.
    `shared_noise` and `noise_mean`: each clip's frames are noised as the pipeline draws a request's initial noise
    with those settings (`shared_frame_noise`, `scaled_mean`), so the model trains on the noise it samples from, as
    AnimateDiff's does (round 38). With `cache_dir`, the encoded clips are kept there for the next run."""
    if flicker_gain < 0:
        raise ValueError(f"flicker_gain must be >= 0, got {flicker_gain}")
    if brightness_gain < 0:
        raise ValueError(f"brightness_gain must be >= 0, got {brightness_gain}")
    if brightness_below is not None and not brightness_below > 0:
        raise ValueError(f"brightness_below must be a sigma > 0 (or None: every one), got {brightness_below}")
    if not 0 <= shared_noise < 1:
        raise ValueError(f"shared_noise must be in [0, 1), got {shared_noise}")
    if not 0 <= noise_mean <= 1:
        raise ValueError(f"noise_mean must be in [0, 1], got {noise_mean}")

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
    readout = None
    if brightness_gain:  # brightness_readout reads AnimateDiff's (clips, C, frames, h, w) layout
        readout = cached(cache_dir and cache_dir / name.replace("latents-", "brightness-"),
                         lambda: brightness_readout(pipe.vae, latents.transpose(1, 2)).transpose(1, 2))
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
        unet = model.unet if isinstance(model, UNetWithImageEncoder) else model
        if unet is model:
            embeds = image_embeds[pick_]
        else:  # the tower trains: its embedding of these first frames, with gradients
            embeds = model.image_encoder(clip_pixels(first[pick_], pipe.feature_extractor)).image_embeds[:, None]
        keep = (torch.rand(batch, generator=generator) >= CONDITION_DROPOUT).float()
        cond_latents = cond_latents * keep[:, None, None, None]  # the pipeline's unconditional half is zeros
        embeds = embeds * keep[:, None, None]
        log_sigma = torch.where(
            torch.rand(batch, generator=generator) < UNIFORM_SHARE,
            torch.rand(batch, generator=generator) * (math.log(SIGMA_MAX) - math.log(SIGMA_MIN)) + math.log(SIGMA_MIN),
            torch.randn(batch, generator=generator) * P_STD + P_MEAN,
        )
        sigma = log_sigma.exp().view(batch, 1, 1, 1, 1)
        if shared_noise:  # SVD's latents are (clips, frames, C, h, w)
            noise = shared_frame_noise(x0.shape, frame_dim=1, share=shared_noise, generator=generator,
                                       device=x0.device, dtype=x0.dtype, mean=noise_mean)
        else:
            noise = scaled_mean(torch.randn(x0.shape, generator=generator), noise_mean)
        noisy = x0 + sigma * noise
        c_in, c_skip, c_out = 1 / (sigma**2 + 1).sqrt(), 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1).sqrt()
        model_in = torch.cat([noisy * c_in, cond_latents[:, None].expand(-1, num_frames, -1, -1, -1)], dim=2)
        out = unet(model_in, 0.25 * log_sigma, encoder_hidden_states=embeds,
                    added_time_ids=time_ids.expand(batch, -1)).sample
        error = out - (x0 - c_skip * noisy) / c_out
        plain = error.square() if pixel_weight is None else pixel_weight[pick_] * error.square()
        total = plain.mean()
        # In x0 terms, since at small sigma (|c_out| ~ sigma) a v error barely moves the denoised frame the decoder
        # shows.
        x0_error = error * c_out.abs()
        if flicker_gain:  # each frame's mean x0 error per channel, against the clip's: the background's flicker
            level = x0_error.mean(dim=(3, 4))  # (clips, frames, C)
            total = total + flicker_gain * (level - level.mean(dim=1, keepdim=True)).square().mean()
        if brightness_gain:  # each frame's x0 error along its decoded background brightness, against the clip's
            shown = (readout[pick_] * x0_error).sum(dim=(2, 3, 4))  # (clips, frames)
            modes = x0_error[0, 0].numel()  # the plain loss's share of one mode: 1 / (C x h x w)
            flicker = (shown - shown.mean(dim=1, keepdim=True)).square().mean(dim=1)  # (clips,)
            if brightness_below is not None:
                flicker = torch.where(sigma.flatten() < brightness_below, flicker, 0.0)
            total = total + brightness_gain / modes * flicker.mean()
        return total

    return loss
