"""AnimateDiff's first stage (round 9): the UNet trained on single frames of the clips, and on frames that differ only
in the shape or the colour (rounds 14, 23), before the clips' stage starts from it."""

from __future__ import annotations

import json

import typer

from asyncvid.training.animatediff import animatediff_loss_fn, pair_loss_fn
from asyncvid.training.loop import finish, train
from asyncvid.training.recipes import COLOUR_PAIR_GEOMETRIES, SHAPE_PAIR_GEOMETRIES


def train_image_stage(pipe, model, config, settings, train_text, shape_pairs=0.0, colour_pairs=0.0) -> bool:
    """AnimateDiff's first stage: `model` trained on single frames of the clips (or loaded, once trained), so the
    clips' stage starts from an image model; with `shape_pairs` / `colour_pairs`, half of each batch is such pairs
    (pair_loss_fn). False when the time limit stopped it before its step budget."""
    final, log_file = config.workdir / "final", config.workdir / "train_log.json"
    log = json.loads(log_file.read_text()) if config.resume and log_file.is_file() else {}
    finished = (final / "config.json").is_file() and log.get("steps", 0) >= config.steps
    weights = {"shape": shape_pairs, "colour": colour_pairs}
    # What a finished stage must have been trained with: (asked, what a log from before the option records:
    # rounds 14, 23 and 32 added them).
    asked = {"shape-pairs": (shape_pairs, 0.0), "colour-pairs": (colour_pairs, 0.0),
             "background": (settings["background"], None)}
    for flag, (value, before) in asked.items():
        trained = log.get(flag.replace("-", "_"), before)
        if finished and trained != value:
            raise typer.BadParameter(
                f"--{flag} {_shown(value)}: the finished image stage in {config.workdir} was trained with "
                f"--{flag} {_shown(trained)}; pass that, or --fresh to train both stages again")
    if not finished:
        # Single frames of the clips' stage's latents: the two stages share its cache.
        cache = config.workdir.parent / "animatediff"
        frames = animatediff_loss_fn(pipe, cache_dir=cache, mean_share=0.0, window=1, **settings)
        geometries = {"shape": SHAPE_PAIR_GEOMETRIES, "colour": COLOUR_PAIR_GEOMETRIES}
        pairs = [pair_loss_fn(pipe, attribute=a, pairs=geometries[a], seed=settings["seed"], cache_dir=cache,
                              schedule=settings["schedule"], snr_cap=settings["snr_cap"], difference_weight=w,
                              background=settings["background"])
                 for a, w in weights.items() if w]
        loss = frames
        if pairs:
            def loss(model, batch, generator):  # half the frames plain, half in pairs: the batch's cost is kept
                per = max(batch // (4 * len(pairs)), 1)  # geometries of each kind, two frames each
                paired = sum(p(model, per, generator) for p in pairs) / len(pairs)
                return (frames(model, batch - batch // 2, generator) + paired) / 2
        log = train(model, loss, config, name="animatediff-image")
        log.update(shape_pairs=shape_pairs, colour_pairs=colour_pairs, background=settings["background"])
        if train_text:
            pipe.text_encoder.save_pretrained(config.workdir / "text_encoder")
        finish(pipe.unet, config, log)
        return log["steps"] >= config.steps
    typer.echo(f"animatediff-image: trained already ({final}); the clips' stage starts from it")
    pipe.unet.load_state_dict(type(pipe.unet).from_pretrained(final).state_dict())
    if train_text:
        pipe.text_encoder.load_state_dict(type(pipe.text_encoder).from_pretrained(config.workdir / "text_encoder")
                                          .state_dict())
    return True


def _shown(value) -> str:
    """An option's value as the command line spells it; unset for None."""
    return "unset" if value is None else f"{value:g}"
