"""Train the embedded models: `python -m asyncvid.training all` (or one stage: vae, animatediff, svd, export; a
trained VAE fine-tuned: vae-invariance, vae-steady).

Each stage resumes from its checkpoint in the work folder; --fresh starts over. Stages after the VAEs need them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer
from diffusers import AutoencoderKL, UNetMotionModel, UNetSpatioTemporalConditionModel
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

from asyncvid.errors import UsageError
from asyncvid.eval.clips import BACKGROUNDS
from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
from asyncvid.training.animatediff import (
    HIGH_NOISE_FROM,
    HIGH_NOISE_SHARE,
    MEAN_SHARE,
    PARTIAL_CAPTIONS,
    SCHEDULE,
    SD_SCHEDULE,
    TEXT_LAYERS,
    TEXT_POSITIONS,
    TRAIN_TEXT,
    UNetWithText,
    animatediff_loss_fn,
    clip_stage_gains,
)
from asyncvid.training.cli_finetunes import vae_invariance, vae_steady
from asyncvid.training.cli_options import (
    Batch,
    Clips,
    Fresh,
    MaxSteps,
    Minutes,
    Seed,
    Threads,
    UNetStage,
    Workdir,
    check_budget,
    check_init_from,
    stage_config,
    trained_part,
    weights_sha256,
    workdir_root,
)
from asyncvid.training.export import export_all, missing_parts
from asyncvid.training.image_stage import train_image_stage
from asyncvid.training.loop import finish, train
from asyncvid.training.recipes import (
    ANIMATEDIFF_STEPS,
    ANNEAL,
    COLOUR_PAIRS,
    IMAGE_BATCH,
    IMAGE_LR,
    IMAGE_STEPS,
    MOTION_GAIN,
    SHAPE_PAIRS,
    SVD_STEPS,
    VAE_RECIPE,
)
from asyncvid.training.svd import UNetWithImageEncoder, svd_loss_fn
from asyncvid.training.vae import (
    KL_WEIGHT,
    build_vae,
    mean_latent_scores,
    round_trip_scores,
    set_scaling_factor,
    vae_loss_fn,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
app.command("vae-invariance")(vae_invariance)  # the fine-tunes of a trained VAE (asyncvid.training.cli_finetunes)
app.command("vae-steady")(vae_steady)

@app.command()
def vae(workdir: Workdir = None, minutes: Annotated[float, typer.Option(help="Wall-clock budget of the whole stage, all phases.")] = 150.0,
        steps: Annotated[Optional[int], typer.Option("--steps", help="Step budget of one custom phase (with the options below; unset ones from the recipe's first phase) \\[default: the recipe, VAE_RECIPE].")] = None,
        batch: Annotated[Optional[int], typer.Option(help="Frames (or windows) per step.")] = None,
        seed: Seed = 0, threads: Threads = 1, fresh: Fresh = False, clips: Clips = 8, lr: Optional[float] = None,
        anneal: Annotated[Optional[int], typer.Option(help="Decay the learning rate linearly to zero over this many final steps of --steps.")] = None,
        crop: Annotated[Optional[int], typer.Option(help="Train on crop x crop windows around the shape; 64 (the frame) trains on whole frames.")] = None,
        edge_weight: Annotated[float, typer.Option(min=0.0, help="Weight of an L1 loss on neighbouring-pixel differences; 0 turns it off.")] = 0.0,
        kl_weight: Annotated[float, typer.Option(min=0.0, help="Weight of the KL term that keeps the latent space smooth.")] = KL_WEIGHT,
        shape_align: Annotated[Optional[float], typer.Option(min=0.0, help="Weight of a loss that makes the shape's latent pixels tell its shape by a whole standard deviation, in every phase; 0 turns it off \\[default: the recipe's; 0 in a custom phase].")] = None,
        latent_noise: Annotated[Optional[float], typer.Option(min=0.0, help="Decode from latents with this much Gaussian noise (in standard deviations), in every phase; 0 turns it off \\[default: the recipe's; 0 in a custom phase].")] = None,
        colour_align: Annotated[Optional[float], typer.Option(min=0.0, help="Weight of a loss that makes the shape's latent pixels tell its colour along directions on a colour wheel, in every phase (round 24); 0 turns it off \\[default: the recipe's; 0 in a custom phase].")] = None):
    """The AutoencoderKL both embedded pipelines decode with, on single frames. By default the r5 recipe
    (VAE_RECIPE): 6,000 steps with the shape alignment, on windows around the shape and then on whole frames,
    then 2,500 more decoding through latent noise, each phase resuming the last (about 27 minutes on two threads);
    its log records the round-trip adherence of the held-out clips."""
    given = {k: v for k, v in dict(steps=steps, anneal=anneal, lr=lr, crop=crop, batch=batch).items() if v is not None}
    if given:  # a custom phase trains without the recipe's extra losses unless they are given
        phases = [{**VAE_RECIPE[0], "anneal": 0, "shape_align": 0.0, "latent_noise": 0.0, "colour_align": 0.0,
                   **given}]
    else:
        phases = list(VAE_RECIPE)
    losses = {k: v for k, v in dict(shape_align=shape_align, latent_noise=latent_noise,
                                    colour_align=colour_align).items() if v is not None}
    _train_vae("vae", build_vae(seed), False, workdir, minutes, [{**phase, **losses} for phase in phases], seed=seed,
               threads=threads, fresh=fresh, clips=clips, edge_weight=edge_weight, kl_weight=kl_weight)


@app.command("svd-vae")
def svd_vae(workdir: Workdir = None, minutes: Minutes = 8.0, steps: MaxSteps = 3000, batch: Batch = 2, seed: Seed = 0,
            threads: Threads = 1, fresh: Fresh = False, clips: Clips = 8, lr: float = 1e-3):
    """SVD's AutoencoderKLTemporalDecoder on 8-frame clips (experimental: the shipped tiny-svd uses `vae`)."""
    _train_vae("svd-vae", build_tiny_svd(seed).vae, True, workdir, minutes,
               [dict(steps=steps, anneal=0, lr=lr, crop=32, batch=batch)], seed=seed, threads=threads, fresh=fresh,
               clips=clips)


def _train_vae(stage, model, temporal, workdir, minutes, phases, *, seed, threads, fresh, clips,
               edge_weight=0.0, kl_weight=KL_WEIGHT) -> None:
    """One VAE stage: reconstruction training phase after phase, each resuming the last one's checkpoint and with
    its own shape alignment and latent noise (0 where it names none), then the latent scaling factor (and, for the
    frame VAE, its round-trip adherence), once, from the last phase."""
    for phase in phases:
        check_budget(phase["steps"], phase["anneal"])
        if phase["crop"] % 8 or not 8 <= phase["crop"] <= 64:
            raise typer.BadParameter(f"--crop {phase['crop']} must be a multiple of 8 from 8 to 64 (the frame)")
    options = dict(edge_weight=edge_weight, kl_weight=kl_weight)
    # Each phase in the log with the loss it trained on.
    phases = [{"shape_align": 0.0, "latent_noise": 0.0, "colour_align": 0.0, **phase, **options}
              for phase in phases]
    earlier = _earlier_phases(workdir_root(workdir) / stage, phases[0]["steps"], fresh)
    for i, phase in enumerate(phases):
        config = stage_config(workdir, stage, minutes=minutes, steps=phase["steps"], batch=phase["batch"], seed=seed,
                         threads=threads, fresh=fresh and i == 0, lr=phase["lr"], ema=0.99, anneal=phase["anneal"])
        loss = vae_loss_fn(model, temporal=temporal, clips_per_caption=clips, seed=seed, edge_weight=edge_weight,
                           crop=phase["crop"], kl_weight=kl_weight, shape_align=phase["shape_align"],
                           latent_noise=phase["latent_noise"], colour_align=phase["colour_align"])
        log = train(model, loss, config, name=stage)
        if log["steps"] < config.steps:
            break  # the time limit (it counts the earlier phases' time too); _finish says how to go on
    # The log's config is the last phase's; `phases` lists those run so far, by this command and those it resumed.
    log.update(**options, crop=phase["crop"], shape_align=phase["shape_align"], latent_noise=phase["latent_noise"],
               colour_align=phase["colour_align"], phases=earlier + phases[:i + 1])
    log["scaling_factor"] = set_scaling_factor(model)
    if not temporal:
        log["round_trip"] = round_trip_scores(model)
        typer.echo(f"{stage}: round trip of the held-out clips {log['round_trip']}")
        log["mean_latent"] = mean_latent_scores(model)
        typer.echo(f"{stage}: the held-out captions' mean latent clips, decoded {log['mean_latent']}")
    finish(model, config, log)


def _earlier_phases(folder: Path, first_steps: int, fresh: bool) -> list[dict]:
    """The phases an earlier command trained the checkpoint this one resumes through: those of its log that end
    before this command's first phase does (a rerun of the same phase replaces its entry)."""
    log_file = folder / "train_log.json"
    if fresh or not log_file.is_file():
        return []
    return [p for p in json.loads(log_file.read_text()).get("phases", []) if p["steps"] < first_steps]


@app.command()
def animatediff(workdir: Workdir = None, minutes: Minutes = 150.0, steps: MaxSteps = ANIMATEDIFF_STEPS, batch: Batch = 4,
                seed: Seed = 0, threads: Threads = 1, fresh: Fresh = False, clips: Clips = 16, lr: float = 8e-4,
                sd_schedule: Annotated[bool, typer.Option(help="Train on SD's epsilon schedule (as r2 did) instead of v-prediction with zero terminal SNR.")] = False,
                snr_cap: Annotated[float, typer.Option(help="Min-SNR cap on the weight of nearly clean steps; 0 turns it off.")] = 5.0,
                object_gain: Annotated[float, typer.Option(min=0.0, help="Extra loss weight on the moving shape's latent pixels; 0 turns it off.")] = 0.0,
                train_text: Annotated[Optional[bool], typer.Option("--train-text/--frozen-text", help="Train the text encoder with the UNet \\[default: asyncvid.training.animatediff.TRAIN_TEXT].")] = None,
                text_layers: Annotated[Optional[int], typer.Option(help="Depth of the text encoder \\[default: asyncvid.training.animatediff.TEXT_LAYERS].")] = None,
                text_positions: Annotated[Optional[bool], typer.Option("--text-positions/--no-text-positions", help="Keep the text encoder's position embeddings \\[default: TEXT_POSITIONS].")] = None,
                high_noise_share: Annotated[Optional[float], typer.Option(help="Share of steps drawn from the noisy end \\[default: HIGH_NOISE_SHARE].")] = None,
                high_noise_from: Annotated[Optional[float], typer.Option(help="Where the noisy end starts, as a fraction of the schedule \\[default: HIGH_NOISE_FROM].")] = None,
                mean_share: Annotated[Optional[float], typer.Option(help="Share of samples trained at pure noise against their caption's mean clip \\[default: MEAN_SHARE].")] = None,
                anneal: Annotated[int, typer.Option(help="Decay the learning rate linearly to zero over this many final steps of --steps; 0 keeps it constant.")] = ANNEAL,
                image_steps: Annotated[int, typer.Option(min=0, help="Steps of the image stage before the clips (single frames; the last fifth annealed); 0 skips it.")] = IMAGE_STEPS,
                image_batch: Annotated[int, typer.Option(min=1, help="Frames per step of the image stage.")] = IMAGE_BATCH,
                image_lr: Annotated[float, typer.Option(help="Learning rate of the image stage.")] = IMAGE_LR,
                motion_gain: Annotated[float, typer.Option(min=0.01, help="Learning rate of the motion modules in the clips' stage, as a multiple of --lr.")] = MOTION_GAIN,
                spatial_gain: Annotated[float, typer.Option(min=0.01, help="Learning rate of the UNet's other layers (convolutions, spatial attention) in the clips' stage, as a multiple of --lr; the text encoder keeps --lr (round 26: 0.25 kept squares, lost triangles and direction).")] = 1.0,
                shape_pairs: Annotated[float, typer.Option(min=0.0, help="Image stage: half of each batch is frames that differ only in the shape, captioned 'a <colour> <shape>', and this weighs the error of their predictions' difference (round 14); 0: plain frames only.")] = SHAPE_PAIRS,
                colour_pairs: Annotated[float, typer.Option(min=0.0, help="Image stage: as --shape-pairs, for frames that differ only in the colour (each with its two nearest: round 23); with both, the pairs' half of the batch is shared.")] = COLOUR_PAIRS,
                shared_noise: Annotated[float, typer.Option(help="Noise the clips' frames share (their spatial means, and this part of the rest), as the pipeline draws it with --shared-noise; 0: each frame's own (r8's recipe).")] = 0.0,
                noise_mean: Annotated[float, typer.Option(min=0.0, max=1.0, help="Clips' stage: scale of each frame's noise mean, as the pipeline draws it with --noise-mean (round 38); 0: zero-mean noise, 1: as drawn.")] = 1.0,
                partial_captions: Annotated[float, typer.Option(min=0.0, max=1.0, help="Clips' stage: this share of samples is captioned without its colour, its shape or both ('a shape moving left'), so only the direction word tells which way (round 17); 0: full captions only.")] = PARTIAL_CAPTIONS,
                flicker_gain: Annotated[float, typer.Option(min=0.0, help="Clips' stage: extra weight on the frames' disagreement in their mean error (the background's flicker, round 27); 0: the plain loss.")] = 0.0,
                brightness_gain: Annotated[float, typer.Option(min=0.0, help="Clips' stage: extra weight on the frames' disagreement in their error along the decoder's brightness (round 28); 0: off.")] = 0.0,
                brightness_below: Annotated[float, typer.Option(min=0.001, max=1.0, help="Clips' stage: charge --brightness-gain only at timesteps below this share of the schedule, where the sampler draws the flicker (round 29); 1: at every one.")] = 1.0,
                brightness_margin: Annotated[Optional[int], typer.Option(min=0, help="Clips' stage: read --brightness-gain's brightness only on latent pixels more than this many from every frame's object (round 30) \\[default: the whole readout].")] = None,
                background: Annotated[Optional[int], typer.Option(min=0, max=len(BACKGROUNDS) - 1, help="Both stages: every clip on this plain tone (an index into asyncvid.eval.clips.BACKGROUNDS), so a caption has one background to draw (round 32) \\[default: all six tones, stripes and gradients].")] = None,
                init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune a trained model: the clips' stage starts from this exported pipeline folder's UNet and text encoder, on its own VAE's latents (e.g. pipelines/weights/tiny-animatediff; round 32); needs --image-steps 0.")] = None):
    """AnimateDiff's UNetMotionModel on 16-frame clips, text through the tiny CLIP text encoder (or --frozen-text);
    r8's recipe by default; r9's, and r13's (r9 fine-tuned with --init-from, --background, --brightness-gain and
    zero-mean shared noise 0.5; sampled since round 39 from one noise for every frame), in docs/MODELS.md. A step
    budget, so a slower machine trains the same model, later."""
    check_budget(steps, anneal)
    if init_from is not None and image_steps:
        raise typer.BadParameter(f"--init-from {init_from} starts the clips' stage from a trained model; "
                                 f"pass --image-steps 0")
    check_init_from(init_from, ("unet",), "pipelines/weights/tiny-animatediff")
    if brightness_below < 1 and not brightness_gain:  # it bounds that term's timesteps: alone it would do nothing
        raise typer.BadParameter(f"--brightness-below {brightness_below:g} needs --brightness-gain G (> 0)")
    if brightness_margin is not None and not brightness_gain:
        raise typer.BadParameter(f"--brightness-margin {brightness_margin} needs --brightness-gain G (> 0)")
    if not 0 <= shared_noise < 1:
        raise typer.BadParameter(f"--shared-noise {shared_noise} must be in [0, 1) (0: each frame's own noise)")
    train_text = TRAIN_TEXT if train_text is None else train_text
    mean_share = (0.0 if sd_schedule else MEAN_SHARE) if mean_share is None else mean_share
    text_layers = TEXT_LAYERS if text_layers is None else text_layers
    text_positions = TEXT_POSITIONS if text_positions is None else text_positions
    high_noise = (HIGH_NOISE_SHARE if high_noise_share is None else high_noise_share,
                  HIGH_NOISE_FROM if high_noise_from is None else high_noise_from)
    pipe = build_tiny_animatediff(seed, text_layers=text_layers, text_positions=text_positions)
    if init_from is None:
        pipe.vae = trained_part(workdir, "vae", AutoencoderKL)
    else:  # the trained model's own parts (its UNet draws in its VAE's latents), in float32 however they were stored
        for part, cls in (("vae", AutoencoderKL), ("unet", UNetMotionModel), ("text_encoder", CLIPTextModel)):
            setattr(pipe, part, cls.from_pretrained(init_from / part, torch_dtype=torch.float32))
    schedule = SD_SCHEDULE if sd_schedule else SCHEDULE
    tone = {} if background is None else {"background": background}  # only then a recipe key: old checkpoints resume
    # The folder's path names where the start was; the UNet's hash pins which weights (a folder's weights get replaced).
    start = {} if init_from is None else {"init_from": str(init_from),
                                          "init_unet_sha256": weights_sha256(init_from / "unet")}
    settings = dict(clips_per_caption=clips, seed=seed, schedule=schedule, snr_cap=snr_cap, object_gain=object_gain,
                    background=background)
    model = UNetWithText(pipe.unet, pipe.text_encoder) if train_text else pipe.unet
    image = None
    if image_steps:
        image = stage_config(workdir, "animatediff-image", minutes=minutes, steps=image_steps, batch=image_batch,
                        seed=seed, threads=threads, fresh=fresh, lr=image_lr, anneal=image_steps // 5,
                        recipe=(("object_gain", object_gain), ("shape_pairs", shape_pairs),
                                ("colour_pairs", colour_pairs), *tone.items()))
        if not train_image_stage(pipe, model, image, settings, train_text, shape_pairs, colour_pairs):
            return
    clip_loss = dict(mean_share=mean_share, shared_noise=shared_noise, partial_captions=partial_captions,
                     flicker_gain=flicker_gain)  # the clips' stage's loss settings, kept in its checkpoint
    for key, value, off in (("brightness_gain", brightness_gain, 0.0), ("brightness_below", brightness_below, 1.0),
                            ("brightness_margin", brightness_margin, None), ("noise_mean", noise_mean, 1.0)):
        if value != off:  # only then a recipe key, so checkpoints trained before the option resume
            clip_loss[key] = value
    config = stage_config(workdir, "animatediff", minutes=minutes, steps=steps, batch=batch, seed=seed, threads=threads,
                     fresh=fresh, lr=lr, anneal=anneal, lr_gains=clip_stage_gains(motion_gain, spatial_gain),
                     recipe=(("object_gain", object_gain), *clip_loss.items(), ("spatial_gain", spatial_gain),
                             *tone.items(), *start.items()))
    loss = animatediff_loss_fn(pipe, cache_dir=config.workdir, high_noise=high_noise, **clip_loss, **settings)
    log = train(model, loss, config, name="animatediff")
    # The recipe, for the model card; export builds the scheduler (and a frozen text encoder) from it.
    log.update(schedule=schedule, snr_cap=snr_cap, object_gain=object_gain, train_text=train_text,
               text_layers=text_layers, text_positions=text_positions, high_noise=dict(zip(("share", "from"), high_noise)),
               image_stage=image and {"steps": image.steps, "batch": image.batch, "lr": image.lr},
               motion_gain=motion_gain, spatial_gain=spatial_gain, shape_pairs=shape_pairs, colour_pairs=colour_pairs,
               **clip_loss, **tone, **start)
    if train_text:
        pipe.text_encoder.save_pretrained(config.workdir / "text_encoder")
    if init_from is not None:  # the latents it trained in, for export: the work folder has no VAE stage of its own
        pipe.vae.save_pretrained(config.workdir / "vae")
    finish(pipe.unet, config, log)


@app.command()
def svd(workdir: Workdir = None, minutes: Minutes = 120.0, steps: MaxSteps = SVD_STEPS, batch: Batch = 8,
        seed: Seed = 0, threads: Threads = 1, fresh: Fresh = False, clips: Clips = 16, lr: float = 8e-4,
        object_gain: Annotated[float, typer.Option(min=0.0, help="Extra loss weight on the shape's latent pixels; 0 turns it off.")] = 0.0,
        anneal: Annotated[Optional[int], typer.Option(help="Decay the learning rate linearly to zero over this many final steps of --steps \\[default: a fifth of them].")] = None,
        train_image_encoder: Annotated[bool, typer.Option("--train-image-encoder/--frozen-image-encoder", help="Train the CLIP vision tower with the UNet, so its embedding can tell the object's colour and shape (the tiny tower is random).")] = False,
        flicker_gain: Annotated[float, typer.Option(min=0.0, help="Extra weight on the frames' disagreement in their mean x0 error (the background's flicker, round 41); 0: the plain loss.")] = 0.0,
        brightness_gain: Annotated[float, typer.Option(min=0.0, help="Extra weight on the frames' disagreement in their x0 error along the decoder's background brightness (AnimateDiff's round 28 term, round 42); 0: off.")] = 0.0,
        brightness_below: Annotated[Optional[float], typer.Option(help="Charge --brightness-gain only at noise levels (sigma) below this, where the sampler draws the flicker (AnimateDiff's round 29 bound, round 42) \\[default: at every one].")] = None,
        shared_noise: Annotated[float, typer.Option(min=0.0, help="Noise the clips' frames share (their spatial means, and this part of the rest), as the pipeline draws it with --shared-noise (round 41; export recommends one noise for every frame whatever the model trained on); 0: each frame's own.")] = 0.0,
        noise_mean: Annotated[float, typer.Option(min=0.0, max=1.0, help="Scale of each frame's noise mean, as the pipeline draws it with --noise-mean (round 41; export recommends 0); 1: as drawn.")] = 1.0,
        init_from: Annotated[Optional[Path], typer.Option(help="Fine-tune a trained model: start from this exported pipeline folder's UNet and CLIP vision tower, on its own VAE's latents (e.g. pipelines/weights/tiny-svd; round 41).")] = None):
    """SVD's UNetSpatioTemporalConditionModel on 8-frame clips, conditioned on their first frames (r5: 4,500 steps,
    the last 900 annealed, about 70 minutes on one thread beside the AnimateDiff run; r6 fine-tunes r5 with
    --init-from and the flicker and brightness terms, about 25 minutes: docs/MODELS.md, round 42).

    It uses the AnimateDiff VAE (frame by frame; the SVD pipeline decodes with any VAE): the temporal decoder
    (`svd-vae`) did not reach usable colours in the CPU budget."""
    anneal = steps // 5 if anneal is None else anneal
    check_budget(steps, anneal)
    if not 0 <= shared_noise < 1:
        raise typer.BadParameter(f"--shared-noise {shared_noise} must be in [0, 1) (0: each frame's own noise)")
    if brightness_below is not None and not (brightness_gain and brightness_below > 0):  # it bounds that term
        raise typer.BadParameter(f"--brightness-below {brightness_below:g} must be a sigma > 0 (e.g. 2), with "
                                 f"--brightness-gain G (> 0)")
    check_init_from(init_from, ("unet", "vae", "image_encoder"), "pipelines/weights/tiny-svd")
    pipe = build_tiny_svd(seed)
    if init_from is None:
        pipe.vae = trained_part(workdir, "vae", AutoencoderKL)
    else:  # the trained model's own parts (its UNet draws in its VAE's latents), in float32 however they were stored
        for part, cls in (("vae", AutoencoderKL), ("unet", UNetSpatioTemporalConditionModel),
                          ("image_encoder", CLIPVisionModelWithProjection)):
            setattr(pipe, part, cls.from_pretrained(init_from / part, torch_dtype=torch.float32))
    # Only when set are they recipe keys, so checkpoints trained before the options resume.
    settings = (("flicker_gain", flicker_gain, 0.0), ("brightness_gain", brightness_gain, 0.0),
                ("brightness_below", brightness_below, None), ("shared_noise", shared_noise, 0.0),
                ("noise_mean", noise_mean, 1.0))
    extra = {key: value for key, value, off in settings if value != off}
    if init_from is not None:  # the folder names where the start was; the UNet's hash pins which weights
        extra.update(init_from=str(init_from), init_unet_sha256=weights_sha256(init_from / "unet"))
    config = stage_config(workdir, "svd", minutes=minutes, steps=steps, batch=batch, seed=seed, threads=threads,
                     fresh=fresh, lr=lr, anneal=anneal, recipe=(("object_gain", object_gain), *extra.items()))
    loss = svd_loss_fn(pipe, clips_per_caption=clips, seed=seed, object_gain=object_gain, flicker_gain=flicker_gain,
                       brightness_gain=brightness_gain, brightness_below=brightness_below, shared_noise=shared_noise,
                       noise_mean=noise_mean, cache_dir=config.workdir)
    model = UNetWithImageEncoder(pipe.unet, pipe.image_encoder) if train_image_encoder else pipe.unet
    log = train(model, loss, config, name="svd")
    log.update(object_gain=object_gain, train_image_encoder=train_image_encoder, **extra)
    if train_image_encoder or init_from is not None:  # trained (the loop left the averaged weights), or brought
        pipe.image_encoder.save_pretrained(config.workdir / "image_encoder")
    if init_from is not None:  # the latents it trained in, for export: the work folder has no VAE stage of its own
        pipe.vae.save_pretrained(config.workdir / "vae")
    finish(pipe.unet, config, log)


@app.command()
def export(workdir: Workdir = None, dest: Annotated[Optional[Path], typer.Option(help="\\[default: the package's pipelines/weights].")] = None,
           scores: Annotated[Optional[Path], typer.Option(help="JSON of adherence scores per model, for the model cards.")] = None,
           only: Annotated[Optional[list[UNetStage]], typer.Option(help="Export only this UNet stage (animatediff or svd); repeat for both \\[default: both].")] = None):
    """Assemble the trained parts into the shipped pipeline folders (float16 safetensors) with model cards."""
    root = workdir_root(workdir)
    stages = tuple(s.value for s in only or UNetStage)
    for gap in filter(None, (missing_parts(root, stage) for stage in stages)):
        raise typer.BadParameter(gap)  # before anything is written
    card_scores = json.loads(scores.read_text()) if scores else {}
    for folder in export_all(root, dest, card_scores, stages):
        typer.echo(f"wrote {folder}")


@app.command("all")
def all_stages(workdir: Workdir = None, seed: Seed = 0,
               steps: Annotated[int, typer.Option(help="Step budget of the AnimateDiff UNet (the last --anneal of them annealed).")] = ANIMATEDIFF_STEPS,
               svd_steps: Annotated[int, typer.Option(help="Step budget of the SVD UNet (it trains beside AnimateDiff; the last fifth annealed).")] = SVD_STEPS,
               minutes: Annotated[float, typer.Option(help="Time limit of the AnimateDiff UNet.")] = 150.0,
               svd_minutes: Annotated[float, typer.Option(help="Time limit of the SVD UNet.")] = 120.0,
               anneal: Annotated[int, typer.Option(help="AnimateDiff steps, at the end of --steps, whose learning rate decays to zero.")] = ANNEAL):
    """tiny-svd r5's recipe and r8's AnimateDiff on one VAE: the VAE on every core, then both UNets side by side
    (one thread each), then export (tiny-animatediff r9 to r13 need the colour-wheel VAE: docs/MODELS.md, shipped
    runs)."""
    check_budget(steps, anneal)  # here, not an hour later when the AnimateDiff stage starts
    root = workdir_root(workdir)
    vae(workdir=root, seed=seed, threads=os.cpu_count() or 1)
    # Two one-thread processes use two cores better than one process with two threads (small tensors: one
    # AnimateDiff step took 1.2-1.4 s on two threads, about what one thread takes beside the SVD run).
    procs = {}
    for stage, budget, limit in (("animatediff", steps, minutes), ("svd", svd_steps, svd_minutes)):
        cmd = [sys.executable, "-m", "asyncvid.training.cli", stage, "--workdir", str(root), "--steps", str(budget),
               "--minutes", str(limit), "--seed", str(seed), "--threads", "1"]
        cmd += ["--anneal", str(anneal if stage == "animatediff" else svd_steps // 5)]
        with (root / f"{stage}.log").open("w") as out:  # the child keeps its own copy of the descriptor
            procs[stage] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        typer.echo(f"{stage}: training {budget} steps (at most {limit:g} min), log in {root / f'{stage}.log'}")
    try:
        while any(p.poll() is None for p in procs.values()):
            time.sleep(5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.terminate()  # Ctrl-C: the stages stop; their last checkpoints resume them
    failed = [stage for stage, p in procs.items() if p.returncode != 0]
    if failed:
        typer.echo(f"{', '.join(failed)} failed; see {root}/<stage>.log, then rerun to resume", err=True)
        raise typer.Exit(1)
    for stage in procs:
        log = json.loads((root / stage / "train_log.json").read_text())
        typer.echo(f"{stage}: {log['steps']} steps in {log['minutes']} min, loss {log['final_loss']}")
    export(workdir=root, dest=None, scores=None, only=None)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except UsageError as err:  # e.g. a checkpoint resumed with another recipe: one line, nothing trained
        typer.echo(f"error: {err}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
