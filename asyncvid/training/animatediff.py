"""AnimateDiff's UNetMotionModel on cached latents: DDPM training with the pipeline's linear betas, conditioned on
captions through the tiny CLIP text encoder (trained with the UNet, or frozen); 10% of captions dropped for guidance.

By default the schedule is rescaled to zero terminal SNR and the UNet predicts v (Lin et al., 2024, "Common
diffusion noise schedules and sample steps are flawed"): with SD's schedule the noisiest training step still shows
7% of the clip, so a model learns to take the object's place and colour from the noise instead of the prompt.
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler

from asyncvid.eval.clips import BACKGROUNDS, COLOURS, SHAPES, render_colours, render_shapes
from asyncvid.pipelines.initial_noise import scaled_mean, shared_frame_noise
from asyncvid.training.data import (
    brightness_readout,
    cache_name,
    cached,
    clip_set,
    encode_frames,
    object_mask,
    off_object,
    pick,
    variant_set,
)

CAPTION_DROPOUT = 0.1
# Train the text encoder with the UNet (`--train-text`; the shipped recipe since r4). There is no pretrained CLIP
# here, and the random frozen one barely tells the direction words apart (its states for "left" and "right" differ
# by 7% of their norm, colours by 25-50%).
TRAIN_TEXT = True
# The frozen text encoder as built (SD's layout: 2 causal layers, position embeddings). Variants tried on this CPU
# (docs/MODELS.md): with 0 layers and no positions every word's state is its own embedding wherever it sits; after
# 1,200 steps colour was learnt as fast as here but direction no better. `--text-layers` / `--no-text-positions`.
TEXT_LAYERS, TEXT_POSITIONS = 2, True
# Optionally draw a share of the steps from the noisy end of the schedule, where the input barely shows where the
# shape is and only the caption can tell its start and colour (a step's target is unchanged: this moves effort, not
# the optimum). Off in the shipped recipe; 0.5 from 0.6 did not make direction learnt sooner.
HIGH_NOISE_SHARE, HIGH_NOISE_FROM = 0.0, 0.6
# Train a share of each batch at the pure-noise step against its caption's mean clip rather than one clip
# (`--mean-share`). At zero terminal SNR the input there is noise alone, so the best prediction is exactly that
# mean: the target is unbiased and far less noisy. That step decides where the shape starts, hence which way it
# moves. With 0.75 (r4) the t = 999 prediction learnt direction for all captions after a ~1,800-step plateau; with
# 0.25 (r5, other clips) and 0 (r3) it did not within the hour (docs/MODELS.md).
MEAN_SHARE = 0.75
# The guidance scale `export` recommends in the model folder's sampling.json. The trained text encoder makes the
# conditional prediction strong: at SD's 7.5 the colours over-saturate (reds turn orange, oranges yellow). Chosen on
# the 46 training captions (r8, sampling seed 0): colour 98% / 91% / 87% / 85% at guidance 2.5 / 4 / 5.5 / 7.5,
# direction 100% at each.
GUIDANCE = 2.5
# The share of the initial noise `export` recommends the frames have in common (sampling.json; their noise means are
# then shared outright, pipelines/initial_noise.py). Sampling r8 with independent noise, a frame's noise mean sets its
# brightness and the background flickers by up to 27 levels of 255; with 0.5 by up to 6, with 0.2 / 0.8 up to 7 / 13
# (12 held-out prompts, seed 0: docs/MODELS.md, round 12). r13.1 (r13's weights, trained at 0.5) is sampled with 1,
# every frame the same noise: a frame's own noise also sets where it draws the object, so with 0.5 its steps are
# uneven and a clip's longest step is often near twice its median (smooth 92 / 90 / 90 / 94% of the 50 held-out
# clips at seeds 0-3); with 1, 100 / 94 / 100 / 98%, and no clip's background steps by more than 2.0 levels
# (round 39).
SHARED_NOISE = 1.0
# The scale of the frames' initial noise mean `export` recommends (sampling.json, pipelines/initial_noise.py). Trained
# on clips over one tone, the model reads the noise's mean as the background's brightness, so a seed whose mean is far
# from zero draws a darker background, and there it flickers: r12 keeps 100 / 96 / 40 / 30% of the 50 held-out clips
# calm at seeds 0-3 with the mean as drawn, 96 / 92 / 96 / 88% without it (docs/MODELS.md, round 37).
NOISE_MEAN = 0.0
# The grid over whose cells the frames share their initial noise's means `export` recommends (sampling.json,
# pipelines/initial_noise.py): a frame's own coarse noise is read as that frame's brightness, so one frame in a clip
# comes out a few levels darker than the next. r13 keeps 98 / 98 / 100 / 98% of the 50 held-out clips calm at seeds
# 0-3 with a grid of 1, 100 / 100 / 100 / 98% with 4 (docs/MODELS.md, round 38). With SHARED_NOISE 1 the frames
# share all of their noise, so there is no own part left for a grid to share.
SHARED_GRID = 1
# The share of clips' samples captioned without their colour, their shape or both (`--partial-captions`). The
# held-out split trains each colour-shape pair on one direction of each axis (asyncvid.eval.clips.heldout_captions),
# so on full captions the direction word need only name the axis: colour and shape tell the sign (round 16's model,
# on r4's VAE, moved 46 of 50 held-out clips backwards). Without colour and shape only the word tells the sign.
# Off in every recipe: on r3's VAE the full-caption run reversed no clip, and 0.5 left direction as it was (80% /
# 76% against 80% / 82%) at the cost of smoothness (docs/MODELS.md, round 17).
PARTIAL_CAPTIONS = 0.0
# What the shipped DDIM scheduler must match; stored in the training log and applied by `export`.
SCHEDULE = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
SD_SCHEDULE = {"prediction_type": "epsilon", "rescale_betas_zero_snr": False, "timestep_spacing": "linspace"}


class UNetWithText(torch.nn.Module):
    """What AnimateDiff training optimises when the text encoder trains too (`--train-text`): the UNet and the text
    encoder that conditions it. The loop saves, averages and restores both. With a frozen encoder the loop is given
    the UNet alone, so its checkpoints stay plain UNet state."""

    def __init__(self, unet, text_encoder):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder.requires_grad_(True)

    def encode(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings as the pipeline's `encode_prompt` makes them (last hidden state, no attention mask)."""
        return self.text_encoder(input_ids)[0]


def clip_stage_gains(motion_gain: float, spatial_gain: float = 1.0) -> tuple[tuple[str, float], ...]:
    """The clips' stage's learning-rate gains (TrainConfig.lr_gains, first match wins): the motion modules at
    `motion_gain` (round 10), the UNet's other layers at `spatial_gain` (round 26: at 0.25 they kept the image
    stage's squares but drew triangles round and lost direction), the text encoder at the plain rate, since only
    this stage teaches it the direction words."""
    if spatial_gain == 1.0:  # r8's split into two groups, so checkpoints trained without the option resume
        return (("motion_modules", motion_gain),)
    return (("motion_modules", motion_gain), ("text_encoder.", 1.0), ("", spatial_gain))  # "": every other name


def partial_texts(caption) -> tuple[str, str, str, str]:
    """The caption in full, then without its colour, without its shape ("shape" stands in), and without both."""
    return (caption.text, f"a {caption.shape} moving {caption.direction}",
            f"a {caption.colour} shape moving {caption.direction}", f"a shape moving {caption.direction}")


def caption_ids(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids padded to the tokenizer's length, as `AnimateDiffPipeline.encode_prompt` tokenizes."""
    return tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def _conditioning(model, ids: torch.Tensor, embeds: torch.Tensor, cond: torch.Tensor):
    """The UNet to call and its prompt embeddings for caption indices `cond`: through the training text encoder
    (`ids`), or the frozen one's `embeds`, computed once."""
    if isinstance(model, UNetWithText):
        return model.unet, model.encode(ids[cond])
    return model, embeds[cond]


def _objective(pipe, schedule: dict | None, snr_cap: float):
    """The training noise schedule, each timestep's loss weight, and the target (v or epsilon) of (x0, noise, t)."""
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config, **(SCHEDULE if schedule is None else schedule))
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas).clamp(min=1e-12)
    v_prediction = noise_schedule.config.prediction_type == "v_prediction"
    # The plain loss weighs a step's x0 error by SNR + 1 (v) or SNR (epsilon); Min-SNR caps that weight.
    plain = snr + 1 if v_prediction else snr.clamp(min=1e-12)
    weight = (plain.clamp(max=snr_cap + 1) / plain) if snr_cap > 0 else torch.ones_like(snr)

    def target_of(x0, noise, t):
        return noise_schedule.get_velocity(x0, noise, t) if v_prediction else noise

    return noise_schedule, weight, target_of


def animatediff_loss_fn(pipe, *, clips_per_caption: int, num_frames: int = 16, seed: int = 0, cache_dir=None,
                        schedule: dict | None = None, snr_cap: float = 5.0, object_gain: float = 0.0,
                        high_noise: tuple[float, float] = (HIGH_NOISE_SHARE, HIGH_NOISE_FROM),
                        mean_share: float = MEAN_SHARE, window: int | None = None, shared_noise: float = 0.0,
                        partial_captions: float = PARTIAL_CAPTIONS, flicker_gain: float = 0.0,
                        brightness_gain: float = 0.0, brightness_below: float = 1.0,
                        brightness_margin: int | None = None, background: int | None = None,
                        noise_mean: float = 1.0):
    """The loss of `pipe.unet` (or of a `UNetWithText`, whose text encoder trains too) over clips encoded once with
    `pipe.vae` (which must be trained already); with `cache_dir`, the encoded clips are kept there for the next run.

    `schedule` overrides the pipeline scheduler's config (default `SCHEDULE`). `snr_cap` > 0 caps each step's weight
    in x0 terms at that SNR + 1 (Min-SNR, Hang et al., 2023), so the nearly clean steps stop dominating the
    gradient; the noisiest steps, where colour and place are decided, keep their full weight. `object_gain` > 0
    weighs the latent pixels of the moving shape (about a tenth of them) 1 + gain times the background's.
    `high_noise` = (share, start): that share of steps is drawn from timesteps >= start x the schedule's length.
    `mean_share`: that share of samples is taken at the last (pure-noise) timestep with its caption's mean latent
    clip as x0 (needs a zero-terminal-SNR schedule, where that mean is the optimal prediction). `window`: each
    sample is that many consecutive frames of a clip from a random start; 1 trains an image model, AnimateDiff's
    first stage (default: the whole clip). `shared_noise` > 0: each clip's frames are noised with noise that shares
    their spatial means and that part of the rest, as the pipeline draws it for a request's `shared_noise`
    (PYoCo trains and samples with its prior; 0 draws every frame's noise on its own, r8's recipe).
    `partial_captions`: that share of samples is captioned without its colour, its shape or both (`partial_texts`,
    one of the three at random), with the mean clip of its partial caption at the pure-noise step.
    `flicker_gain` > 0: each frame's spatial-mean error, less its clip's mean over the frames, is weighed 1 + gain
    times (the plain loss counts it as one of h x w spatial modes), so frames that disagree on their brightness cost
    more than the few latent values they differ in (round 27).
    `brightness_gain` > 0: the same for each frame's error along the direction in which the decoder shows it as
    brightness (`brightness_readout`, computed once at the clip's latents and cached): that one of the C x h x w
    modes is weighed 1 + gain times when it differs from the clip's mean over the frames (round 28); not in samples
    trained against a caption's mean clip (`mean_share`), whose target is not the clip the readout was taken at.
    `brightness_below` < 1: that term only at timesteps below this share of the schedule, where the sampler draws
    the flicker (round 29: from about 0.6 down), not where it decides the object's place and path.
    `brightness_margin` k: the readout only on latent pixels more than k from every frame's object (`off_object`).
    `background`: every clip on that plain tone (an index into BACKGROUNDS), so a caption, which names no background,
    has one clip to draw rather than a brightness its frames must agree on (round 32); None: the six tones, stripes
    and gradients.
    `noise_mean` < 1: each frame's noise has its spatial mean (per channel) scaled by it (`scaled_mean`), as the
    pipeline draws it for a request's `noise_mean`, so the model trains on the noise it samples from (round 38: at 0
    no clip's training noise sets its brightness).
    """
    high_share, high_from = high_noise
    window = num_frames if window is None else window
    if not 1 <= window <= num_frames:
        raise ValueError(f"window must be from 1 to num_frames ({num_frames}), got {window}")
    if background is not None and not 0 <= background < len(BACKGROUNDS):
        raise ValueError(f"background must index BACKGROUNDS (0 to {len(BACKGROUNDS) - 1}), got {background}")

    def encode():
        captions, clips = clip_set(clips_per_caption, num_frames, seed, background)
        # (clips, frames, C, h, w) -> (clips, C, frames, h, w), AnimateDiff's latent layout
        latents = encode_frames(pipe.vae, clips.flatten(0, 1)).unflatten(0, (len(clips), num_frames))
        return captions, latents.transpose(1, 2)

    name = cache_name(pipe.vae, clips=clips_per_caption, frames=num_frames, seed=seed, background=background)
    captions, latents = cached(cache_dir and cache_dir / name, encode)
    n = len(latents)
    pixel_weight = 1.0 + object_gain * object_mask(latents) if object_gain > 0 else torch.ones(())
    # Each clip's captions: (clips, 1) in full only, or (clips, 4) with its partial ones (partial_texts).
    variants = [partial_texts(c) if partial_captions else (c.text,) for c in captions]
    texts = sorted({t for v in variants for t in v})
    index = torch.tensor([[texts.index(t) for t in v] for v in variants])
    ids = caption_ids(pipe.tokenizer, texts + [""])  # the empty prompt is the unconditional one
    with torch.no_grad():  # what a frozen encoder gives, computed once
        embeds = pipe.encode_prompt(texts + [""], "cpu", 1, False)[0]
    noise_schedule, weight, target_of = _objective(pipe, schedule, snr_cap)
    steps = noise_schedule.config.num_train_timesteps
    alphas = noise_schedule.alphas_cumprod
    if not 0 <= shared_noise < 1:
        raise ValueError(f"shared_noise must be in [0, 1), got {shared_noise}")
    if not 0 <= noise_mean <= 1:
        raise ValueError(f"noise_mean must be in [0, 1], got {noise_mean}")
    if not 0 <= mean_share <= 1:
        raise ValueError(f"mean_share must be in [0, 1], got {mean_share}")
    if not 0 <= partial_captions <= 1:
        raise ValueError(f"partial_captions must be in [0, 1], got {partial_captions}")
    if flicker_gain < 0:
        raise ValueError(f"flicker_gain must be >= 0, got {flicker_gain}")
    if brightness_gain < 0:
        raise ValueError(f"brightness_gain must be >= 0, got {brightness_gain}")
    if not 0 < brightness_below <= 1:
        raise ValueError(f"brightness_below must be in (0, 1], got {brightness_below}")
    if brightness_margin is not None and brightness_margin < 0:
        raise ValueError(f"brightness_margin must be >= 0 (or None: the whole readout), got {brightness_margin}")
    readout = None
    if brightness_gain:
        readout = cached(cache_dir and cache_dir / name.replace("latents-", "brightness-"),
                         lambda: brightness_readout(pipe.vae, latents))
        if brightness_margin is not None:
            readout = off_object(readout, latents, brightness_margin)
    if mean_share > 0 and float(alphas[-1]) > 1e-6:
        raise ValueError(f"mean_share {mean_share} needs a zero-terminal-SNR schedule (the last step's input must be "
                         f"pure noise); use the default schedule or mean_share 0")
    # Each caption's mean latent clip (a partial one's over all clips it fits), and (last row) the mean of all clips
    # for the empty prompt.
    means = torch.stack([latents[(index == i).any(1)].mean(0) for i in range(len(texts))] + [latents.mean(0)])

    def frames(x, start):
        """Each clip of `x` cut to `window` frames from its `start`."""
        if window == num_frames or not x.ndim:
            return x
        return torch.stack([clip[:, s:s + window] for clip, s in zip(x, start.tolist())])

    def loss(model, batch, generator):
        pick_ = pick(n, batch, generator)
        start = None
        if window < num_frames:
            start = torch.randint(0, num_frames - window + 1, (batch,), generator=generator)
        x0 = frames(latents[pick_], start)
        if shared_noise:
            noise = shared_frame_noise(x0.shape, frame_dim=2, share=shared_noise, generator=generator,
                                       device=x0.device, dtype=x0.dtype, mean=noise_mean)
        else:
            noise = scaled_mean(torch.randn(x0.shape, generator=generator), noise_mean)
        t = torch.randint(0, steps, (batch,), generator=generator)
        if high_share > 0:
            noisy_end = torch.randint(int(steps * high_from), steps, (batch,), generator=generator)
            t = torch.where(torch.rand(batch, generator=generator) < high_share, noisy_end, t)
        dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
        variant = torch.zeros(batch, dtype=torch.long)
        if partial_captions:  # drawn only then, so full-caption runs keep their random stream
            partial = torch.rand(batch, generator=generator) < partial_captions
            variant = torch.where(partial, torch.randint(1, 4, (batch,), generator=generator), variant)
        cond = torch.where(dropped, len(texts), index[pick_, variant])
        at_mean = torch.zeros(batch, dtype=torch.bool)
        if mean_share > 0:
            at_mean = torch.rand(batch, generator=generator) < mean_share
            t = torch.where(at_mean, steps - 1, t)
            x0 = torch.where(at_mean[:, None, None, None, None], frames(means[cond], start), x0)
        # The pipeline repeats the prompt embedding once per frame; so does training.
        unet, hidden = _conditioning(model, ids, embeds, cond)
        hidden = hidden.repeat_interleave(window, dim=0)
        pred = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        target = target_of(x0, noise, t)
        weight_map = frames(pixel_weight[pick_] if pixel_weight.ndim else pixel_weight, start)
        error = pred - target
        per_clip = (weight_map * error.square()).mean(dim=(1, 2, 3, 4))
        if flicker_gain:
            # Each frame's mean error per channel, against the clip's: what the decoder shows as flicker.
            level = error.mean(dim=(3, 4))
            per_clip = per_clip + flicker_gain * (level - level.mean(dim=2, keepdim=True)).square().mean(dim=(1, 2))
        if brightness_gain:
            # Each frame's error along its decoded brightness, against the clip's: flicker in the decoder's terms.
            # Not where the target is a caption's mean clip (the readout is the picked clip's), nor at timesteps
            # from `brightness_below` up, where round 29's term turned paths and the sampler draws no flicker.
            shown = (frames(readout[pick_], start) * error).sum(dim=(1, 3, 4))  # (clips, frames)
            modes = error[0, :, 0].numel()  # the plain loss's share of one mode: 1 / (C x h x w)
            flicker = (shown - shown.mean(dim=1, keepdim=True)).square().mean(1)
            charged = ~at_mean & (t < brightness_below * steps)
            per_clip = per_clip + brightness_gain / modes * torch.where(charged, flicker, 0.0)
        return (weight[t] * per_clip).mean()

    return loss


# Colour pairs pair each colour with its two nearest in RGB (red, orange and yellow with each other): the hues a
# model trades for one another (round 23: on the r5 VAE, red came out orange and orange yellow).
COLOUR_NEIGHBOURS = 2


def _partners(attribute: str) -> torch.Tensor:
    """(values, k): the values of `attribute` each value is paired with, as indices into SHAPES or COLOURS."""
    if attribute == "shape":  # every other shape
        return torch.tensor([[(v + k) % len(SHAPES) for k in range(1, len(SHAPES))] for v in range(len(SHAPES))])
    if attribute == "colour":
        rgb = torch.tensor(list(COLOURS.values()), dtype=torch.float32)
        return torch.cdist(rgb, rgb).argsort(dim=1)[:, 1:1 + COLOUR_NEIGHBOURS]
    raise ValueError(f"attribute must be 'shape' or 'colour', got '{attribute}'")


def pair_loss_fn(pipe, *, pairs: int, attribute: str = "shape", seed: int = 0, cache_dir=None,
                 schedule: dict | None = None, snr_cap: float = 5.0, difference_weight: float = 4.0,
                 background: int | None = None):
    """An image model's loss on frames that differ only in one word's `attribute` ("shape" or "colour"),
    captioned "a <colour> <shape>": each sample is one geometry drawn with two values of it, noised with the same
    noise at the same step; besides each frame's own error, `difference_weight` weighs the error of the two
    predictions' difference against the two targets'.

    A square and a circle of the same area (clips version 1) differ in a few latent pixels at their outline (a
    seventh of what a triangle and a circle differ by), so on plain frames the UNet learned colour, place and the
    triangle and drew squares and circles alike (docs/MODELS.md, round 14; version 2 draws squares on the circle's
    box, round 16). The difference cancels what the two frames share (the
    background, the place, the noise) and leaves the word's share of the prediction. Colours are paired with their
    nearest (`_partners`). Every colour-shape pair occurs in training, so no held-out combination is shown; `pairs`
    geometries are encoded once with `pipe.vae`, each on the plain tone `background` if given (round 32).
    """
    partners = _partners(attribute)
    values = SHAPES if attribute == "shape" else list(COLOURS)
    render = render_shapes if attribute == "shape" else render_colours

    def encode():
        others, frames = variant_set(render, pairs, seed, background)  # the word each geometry keeps, a frame per value
        latents = encode_frames(pipe.vae, frames.flatten(0, 1)).unflatten(0, (pairs, len(values)))
        return others, latents.unsqueeze(3)  # (pairs, values, C, 1 frame, h, w)

    name = cache_name(pipe.vae, **{"shapes" if attribute == "shape" else "colours": pairs}, seed=seed,
                      background=background)
    others, latents = cached(cache_dir and cache_dir / name, encode)

    def text(other, value):
        return f"a {other} {value}" if attribute == "shape" else f"a {value} {other}"

    texts = [text(o, v) for o in dict.fromkeys(others) for v in values]
    index = torch.tensor([[texts.index(text(o, v)) for v in values] for o in others])
    ids = caption_ids(pipe.tokenizer, texts + [""])
    with torch.no_grad():
        embeds = pipe.encode_prompt(texts + [""], "cpu", 1, False)[0]
    noise_schedule, weight, target_of = _objective(pipe, schedule, snr_cap)

    def loss(model, batch, generator):
        row = pick(pairs, batch, generator)
        first = torch.randint(0, len(values), (batch,), generator=generator)
        second = partners[first, torch.randint(0, partners.shape[1], (batch,), generator=generator)]
        x0 = torch.cat([latents[row, first], latents[row, second]])
        cond = torch.cat([index[row, first], index[row, second]])
        dropped = (torch.rand(batch, generator=generator) < CAPTION_DROPOUT).repeat(2)
        cond = torch.where(dropped, len(texts), cond)
        noise = torch.randn(x0[:batch].shape, generator=generator).repeat(2, 1, 1, 1, 1)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,), generator=generator).repeat(2)
        unet, hidden = _conditioning(model, ids, embeds, cond)
        error = unet(noise_schedule.add_noise(x0, noise, t), t, encoder_hidden_states=hidden).sample
        error = error - target_of(x0, noise, t)
        own = error.square().mean(dim=(1, 2, 3, 4))
        difference = (error[:batch] - error[batch:]).square().mean(dim=(1, 2, 3, 4))
        return (weight[t] * own).mean() + difference_weight * (weight[t[:batch]] * difference).mean()

    return loss
