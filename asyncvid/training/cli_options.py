"""The training CLI's shared options and the helpers its commands share: where a stage's work folder is, its
config, what a trained part is."""

from __future__ import annotations

import hashlib
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from asyncvid.pipelines.embedded import cache_root
from asyncvid.training.loop import TrainConfig

Workdir = Annotated[Optional[Path], typer.Option(help="Checkpoints and trained parts \\[default: $ASYNCVID_HOME/training].")]
Minutes = Annotated[float, typer.Option(help="Wall-clock budget of this stage.")]
MaxSteps = Annotated[int, typer.Option("--steps", help="Step budget of this stage (whichever of steps and minutes ends first).")]
Batch = Annotated[int, typer.Option(help="Clips (or frames, for the AnimateDiff VAE) per step.")]
Seed = Annotated[int, typer.Option(help="Seed of data, initial weights and batches.")]
Threads = Annotated[int, typer.Option(help="CPU threads (torch.set_num_threads).")]
Fresh = Annotated[bool, typer.Option(help="Ignore an existing checkpoint and start over.")]
Clips = Annotated[int, typer.Option(help="Clips rendered per training caption.")]
# What export can ship: asyncvid.training.export.NAMES's keys, spelt here so `--help` needs no torch import.
UNetStage = Enum("UNetStage", {"animatediff": "animatediff", "svd": "svd"}, type=str)


def workdir_root(workdir: Path | None) -> Path:
    return cache_root() / "training" if workdir is None else workdir


def stage_config(workdir, stage, **kw):
    return TrainConfig(workdir=workdir_root(workdir) / stage, resume=not kw.pop("fresh"), **kw)


def weights_sha256(folder: Path) -> str:
    """SHA-256 over a model folder's weight files, in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def trained_part(workdir: Path | None, stage: str, cls):
    folder = workdir_root(workdir) / stage / "final"
    if not (folder / "config.json").is_file():
        raise typer.BadParameter(f"no trained {stage} in {folder}; run `python -m asyncvid.training {stage}` first")
    return cls.from_pretrained(folder)


def check_budget(steps: int, anneal: int) -> None:
    if not 0 <= anneal <= steps:  # here, not after the clips are rendered
        raise typer.BadParameter(f"--anneal {anneal} must be between 0 and --steps ({steps})")


def check_init_from(init_from: Path | None, parts: tuple[str, ...], example: str = "") -> None:
    """Refuse, before any work, an --init-from folder without one of the diffusers parts it must hold."""
    lacking = init_from and next((part for part in parts if not (init_from / part / "config.json").is_file()), None)
    if lacking:
        such = f" such as {example}" if example else ""
        raise typer.BadParameter(f"--init-from {init_from}: no {lacking}/config.json there; pass an exported "
                                 f"pipeline folder{such}")
