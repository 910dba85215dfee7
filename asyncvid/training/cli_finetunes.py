"""The training CLI's fine-tunes of a trained VAE, each writing its --init-from folder again at --dest with the new
VAE (registered on asyncvid.training.cli's app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from asyncvid.training import cli_options as opt
from asyncvid.training.colour_invariance import fine_tune
from asyncvid.training.steady_decoder import fine_tune_decoder

Anneal = Annotated[int, typer.Option(help="Decay the learning rate linearly to zero over this many final steps.")]


def _check_folders(init_from: Path, dest: Path, steps: int, anneal: int) -> None:
    """Refuse, before any work, a budget that cannot anneal, a folder without a VAE, or an existing --dest."""
    opt.check_budget(steps, anneal)
    opt.check_init_from(init_from, ("vae",))
    if dest.exists():
        raise typer.BadParameter(f"--dest {dest} exists; name a new folder")


def vae_invariance(init_from: Annotated[Path, typer.Option(help="An exported tiny-animatediff folder whose VAE to fine-tune (r9's: docs/MODELS.md).")],
                   dest: Annotated[Path, typer.Option(help="A new folder: --init-from's with the fine-tuned VAE, for `animatediff --init-from`.")],
                   workdir: opt.Workdir = None, minutes: opt.Minutes = 60.0, steps: opt.MaxSteps = 600, batch: opt.Batch = 8,
                   seed: opt.Seed = 0, threads: opt.Threads = 2, fresh: opt.Fresh = False, lr: float = 1e-4, anneal: Anneal = 180,
                   invariance: Annotated[float, typer.Option(min=0.0, help="Weight of the colour pairs' latent difference off the object.")] = 1.0,
                   anchor: Annotated[float, typer.Option(min=0.0, help="Weight of the distance to the starting encoder's latents.")] = 0.1):
    """Fine-tune a trained VAE so its background latent does not follow the object's colour (round 36; ~20 min)."""
    _check_folders(init_from, dest, steps, anneal)
    config = opt.stage_config(workdir, "vae-invariance", minutes=minutes, steps=steps, batch=batch, seed=seed, threads=threads,
                          fresh=fresh, lr=lr, ema=0.99, anneal=anneal, recipe=(("invariance", invariance), ("anchor", anchor)))
    fine_tune(init_from, dest, config, invariance=invariance, anchor=anchor, shape_align=0.3, colour_align=0.3,
              latent_noise=0.2)


def vae_steady(init_from: Annotated[Path, typer.Option(help="An exported pipeline folder whose VAE decoder to fine-tune (tiny-svd r6: docs/MODELS.md, round 43).")],
               dest: Annotated[Path, typer.Option(help="A new folder: --init-from's with the fine-tuned VAE (its encoder, so its UNet's latents, unchanged).")],
               workdir: opt.Workdir = None, minutes: opt.Minutes = 60.0, steps: opt.MaxSteps = 800, batch: Annotated[int, typer.Option(help="Whole clips per step.")] = 4,
               seed: opt.Seed = 0, threads: opt.Threads = 2, fresh: opt.Fresh = False, clips: opt.Clips = 8, lr: float = 2e-4, anneal: Anneal = 240,
               steadiness: Annotated[float, typer.Option(min=0.0, help="Weight of each frame's background brightness error off its clip's mean.")] = 3000.0,
               latent_noise: Annotated[float, typer.Option(min=0.0, help="Decode from latents with up to this much Gaussian noise (in standard deviations).")] = 0.05):
    """Fine-tune a trained VAE's decoder to draw a clip's background at one brightness in every frame (round 43;
    ~10 min on two threads)."""
    _check_folders(init_from, dest, steps, anneal)
    config = opt.stage_config(workdir, "vae-steady", minutes=minutes, steps=steps, batch=batch, seed=seed, threads=threads,
                          fresh=fresh, lr=lr, ema=0.99, anneal=anneal,
                          recipe=(("steadiness", steadiness), ("latent_noise", latent_noise), ("clips", clips)))
    fine_tune_decoder(init_from, dest, config, clips=clips, steadiness=steadiness, latent_noise=latent_noise)
