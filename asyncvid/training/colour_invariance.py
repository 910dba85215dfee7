"""A trained frame VAE fine-tuned so that the background's latent does not follow the object's colour (round 36).

The colour-wheel VAE's group norms and mid-block attention see the whole frame, so latent pixels far from the object
carry its hue (a green object's background code differs from a red one's by 0.4 standard deviations). A UNet learns
that code, and classifier-free guidance pushes it further: green and cyan clips' backgrounds come out darker and
flickering (docs/MODELS.md, rounds 35-36). Each step here encodes pairs of frames that differ only in the object's
colour and charges their latent means' difference a latent pixel or more away from the object, beside the recipe's
reconstruction, shape and colour alignment, and an anchor to the starting encoder, whose latents the UNet knows.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from asyncvid.eval.clips import BACKGROUNDS, COLOURS, SHAPES, heldout_captions, render, training_captions
from asyncvid.training.data import object_weight
from asyncvid.training.loop import TrainConfig, finish, train
from asyncvid.training.vae import COLOUR_WHEEL, KL_WEIGHT, _label_error, colour_readout, shape_readout

TONE = len(BACKGROUNDS) - 1  # the one tone the AnimateDiff fine-tunes train on (`animatediff --background 5`)
TONE_SHARE = 0.5  # of the pairs on it; the rest on the clips' own backgrounds
FRAMES = 16  # a pair is one frame of a clip of this many, so positions are spread as in the UNets' clips
SPREAD_EVERY = 5  # `background_code_spread` reads every fifth frame of each held-out clip (0, 5, 10, 15)


def colour_pair(generator: torch.Generator, captions=None) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """A frame of a training clip and the same frame with the object in another colour: uint8 (2, 64, 64, 3), the
    shape's index and the two colours' indices on COLOUR_WHEEL."""
    captions = captions or training_captions()  # the loss passes them: building the list costs ~35 ms
    draws = torch.randint(0, 1 << 30, (5,), generator=generator).tolist()
    caption = captions[draws[0] % len(captions)]
    other = _another_colour(caption.colour, draws[1])
    background = TONE if draws[2] < TONE_SHARE * (1 << 30) else None
    frame = draws[4] % FRAMES
    pair = [render(caption, draws[3], FRAMES, background, colour)[frame] for colour in (None, other)]
    return np.stack(pair), SHAPES.index(caption.shape), COLOUR_WHEEL.index(caption.colour), COLOUR_WHEEL.index(other)


def _another_colour(colour: str, k: int) -> str:
    """The colour k steps (mod the other seven) further round COLOUR_WHEEL: never `colour` itself."""
    return COLOUR_WHEEL[(COLOUR_WHEEL.index(colour) + 1 + k % (len(COLOURS) - 1)) % len(COLOURS)]


def colour_invariance_loss_fn(vae, *, invariance: float, anchor: float, shape_align: float, colour_align: float,
                              latent_noise: float):
    """The loss of a VAE fine-tune from `vae`'s weights: per step `batch` colour pairs (2 x batch frames),
    object-weighted MSE + L1 of their reconstructions from latents with `latent_noise` (in standard deviations),
    `invariance` x the pairs' squared latent difference off the object, `anchor` x the squared distance to the
    starting encoder's latents, and the shape and colour alignment on the object's latent pixels."""
    start = copy.deepcopy(vae).requires_grad_(False).eval()
    scale = 1.0 / vae.config.scaling_factor  # the latents' standard deviation: the UNet's scale is kept
    readouts = shape_readout(), colour_readout()
    captions = training_captions()

    def loss(model, batch, generator):
        pairs = [colour_pair(generator, captions) for _ in range(batch)]
        frames = np.concatenate([p[0][:1] for p in pairs] + [p[0][1:] for p in pairs])  # firsts, then seconds
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        shapes = torch.tensor([p[1] for p in pairs] * 2)
        colours = torch.tensor([p[2] for p in pairs] + [p[3] for p in pairs])
        posterior = model.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator)
        recon = model.decode(posterior.sample(generator=generator) + latent_noise * scale * noise).sample
        w = object_weight(x)
        err = recon - x
        total = (w * err.square()).mean() + (w * err.abs()).mean() + KL_WEIGHT * posterior.kl().mean()
        on_object = (w > 1).float()
        cells = F.max_pool2d(on_object, x.shape[-1] // posterior.mean.shape[-1])  # latent pixels the object touches
        off = 1.0 - F.max_pool2d(torch.maximum(cells[:batch], cells[batch:]), 3, 1, 1)  # and their neighbours
        latents = posterior.mean / scale
        apart = (latents[:batch] - latents[batch:]).square() * off
        total = total + invariance * apart.sum() / (off.sum() * latents.shape[1]).clamp(min=1.0)
        with torch.no_grad():
            before = start.encode(x).latent_dist.mean / scale
        total = total + anchor * (latents - before).square().mean()
        for weight, labels, readout in ((shape_align, shapes, readouts[0]), (colour_align, colours, readouts[1])):
            total = total + weight * _label_error(latents, on_object, labels, readout)
        return total

    return loss


@torch.no_grad()
def background_code_spread(vae, *, seed: int = 0) -> float:
    """Mean absolute difference (in latent standard deviations) between the latents of each held-out caption's clip
    over the one tone and the same clip with the object in another colour, a latent pixel or more off the object."""
    scale, spread = 1.0 / vae.config.scaling_factor, []
    for k, caption in enumerate(heldout_captions()):
        other = _another_colour(caption.colour, k)
        clips = [render(caption, seed, FRAMES, TONE, colour)[::SPREAD_EVERY] for colour in (None, other)]
        x = torch.from_numpy(np.concatenate(clips)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        latents = vae.encode(x).latent_dist.mean / scale
        n = len(x) // 2
        cells = F.max_pool2d((object_weight(x[:n]) > 1).float(), x.shape[-1] // latents.shape[-1])
        off = (F.max_pool2d(cells, 3, 1, 1) == 0).expand(-1, latents.shape[1], -1, -1)
        spread.append(float((latents[:n] - latents[n:]).abs()[off].mean()))
    return float(np.mean(spread))


def fine_tune(init_from: Path, dest: Path, config: TrainConfig, **weights) -> dict:
    """Fine-tune the VAE of the pipeline folder `init_from` on `colour_invariance_loss_fn(**weights)` and write the
    folder again at `dest` with that VAE (the UNet's latents keep their scale); returns the log."""
    model = AutoencoderKL.from_pretrained(init_from / "vae")
    before = background_code_spread(model)
    log = train(model, colour_invariance_loss_fn(model, **weights), config, name="vae-invariance")
    log.update(init_from=str(init_from), **weights,
               background_code_spread={"before": round(before, 4), "after": round(background_code_spread(model), 4)})
    finish(model, config, log)
    if log["steps"] == config.steps:
        shutil.copytree(init_from, dest, ignore=shutil.ignore_patterns("vae"))
        model.save_pretrained(dest / "vae")
    return log
