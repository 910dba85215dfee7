"""AnimateDiff's UNetMotionModel on cached latents: DDPM noise prediction with the pipeline's linear betas,
conditioned on captions through the (frozen) tiny CLIP text encoder; 10% of captions dropped for guidance."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from .data import cache_name, cached, clip_set, encode_frames, pick

CAPTION_DROPOUT = 0.1


def animatediff_loss_fn(pipe, *, clips_per_caption: int, num_frames: int = 16, seed: int = 0, cache_dir=None):
    """The loss for `pipe.unet` over clips encoded once with `pipe.vae` (which must be trained already); with
    `cache_dir`, the encoded clips are kept there for the next run."""

    def encode():
        captions, clips = clip_set(clips_per_caption, num_frames, seed)
        # (clips, frames, C, h, w) -> (clips, C, frames, h, w), AnimateDiff's latent layout
        latents = encode_frames(pipe.vae, clips.flatten(0, 1)).unflatten(0, (len(clips), num_frames))
        return captions, latents.transpose(1, 2)

    name = cache_name(pipe.vae, clips=clips_per_caption, frames=num_frames, seed=seed)
    captions, latents = cached(cache_dir and cache_dir / name, encode)
    n = len(latents)
    texts = sorted({c.text for c in captions})
    index = torch.tensor([texts.index(c.text) for c in captions])
    with torch.no_grad():
        embeds = pipe.encode_prompt(texts + [""], "cpu", 1, False)[0]  # the empty prompt is the unconditional one
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    steps = noise_schedule.config.num_train_timesteps

    def loss(model, batch, generator):
        pick_ = pick(n, batch, generator)
        x0 = latents[pick_]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, steps, (batch,), generator=generator)
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        cond = torch.where(dropped, len(texts), index[pick_])
        # The pipeline repeats the prompt embedding once per frame; so does training.
        hidden = embeds[cond].repeat_interleave(num_frames, dim=0)
        pred = model(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        return torch.nn.functional.mse_loss(pred, noise)

    return loss
