"""The trained parts as shipped pipeline folders: float16 safetensors (the package stays small) and a model card."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    StableVideoDiffusionPipeline,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import CLIPTextModel, CLIPVisionModelWithProjection

import asyncvid.pipelines
from asyncvid.eval.clips import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, heldout_captions, training_captions
from asyncvid.models import sampling_defaults
from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd
from asyncvid.training.animatediff import GUIDANCE, NOISE_MEAN, SD_SCHEDULE, SHARED_GRID, SHARED_NOISE
from asyncvid.training.svd import MAX_GUIDANCE
from asyncvid.training.svd import NOISE_MEAN as SVD_NOISE_MEAN
from asyncvid.training.svd import SHARED_NOISE as SVD_SHARED_NOISE

NAMES = {"animatediff": "tiny-animatediff", "svd": "tiny-svd"}


def default_dest() -> Path:
    """pipelines/weights inside the installed package (asyncvid.pipelines)."""
    return Path(asyncvid.pipelines.__file__).parent / "weights"


def assemble_animatediff(root: Path):
    """The tiny AnimateDiff pipeline with the trained VAE (or the one a fine-tune started from), UNet and text encoder
    (as built, if it was frozen)."""

    # The frozen text encoder and the sampler's schedule must be the ones the UNet was trained with (logs from
    # before they were recorded mean SD's schedule and two text layers).
    log = json.loads((root / "animatediff" / "train_log.json").read_text())
    base = build_tiny_animatediff(int(log["config"]["seed"]), text_layers=log.get("text_layers", 2),
                                  text_positions=log.get("text_positions", True))
    scheduler = DDIMScheduler.from_config(base.scheduler.config, **log.get("schedule", SD_SCHEDULE))
    text_encoder = (CLIPTextModel.from_pretrained(root / "animatediff" / "text_encoder") if log.get("train_text")
                    else base.text_encoder)
    vae = AutoencoderKL.from_pretrained(_stage_vae(root, "animatediff"))
    # motion_adapter=None: the UNetMotionModel already holds the motion modules; a copy would double the size.
    return AnimateDiffPipeline(
        unet=UNetMotionModel.from_pretrained(root / "animatediff" / "final"), motion_adapter=None,
        vae=vae, text_encoder=text_encoder,
        tokenizer=base.tokenizer, scheduler=scheduler,
    )


def assemble_svd(root: Path):
    """The tiny SVD pipeline with the trained VAE (or the one a fine-tune started from) and UNet, and the CLIP vision
    tower it trained with (as built, if it was frozen)."""
    log = json.loads((root / "svd" / "train_log.json").read_text())
    base = build_tiny_svd(int(log["config"]["seed"]))  # the frozen CLIP vision tower it was trained with
    # A fine-tune (`svd --init-from`) keeps the tower it started from there too.
    image_encoder = (CLIPVisionModelWithProjection.from_pretrained(root / "svd" / "image_encoder")
                     if log.get("train_image_encoder") or log.get("init_from") else base.image_encoder)
    return StableVideoDiffusionPipeline(
        unet=UNetSpatioTemporalConditionModel.from_pretrained(root / "svd" / "final"),
        vae=AutoencoderKL.from_pretrained(_stage_vae(root, "svd")),  # see `python -m asyncvid.training svd --help`
        image_encoder=image_encoder, scheduler=base.scheduler, feature_extractor=base.feature_extractor,
    )


def _stage_vae(root: Path, stage: str) -> Path:
    """Where `stage`'s VAE is: a fine-tune (`animatediff` or `svd --init-from`, as its log says) keeps the one it
    started from beside its UNet (a stale copy there from an earlier fine-tune is not read); otherwise the work
    folder's VAE stage."""
    log = root / stage / "train_log.json"
    if log.is_file() and json.loads(log.read_text()).get("init_from"):
        return root / stage / "vae"
    return root / "vae" / "final"


def missing_parts(root: Path, stage: str) -> str | None:
    """What `stage`'s pipeline lacks in the work folder `root`, and the command that makes it (None: nothing)."""
    if not (root / stage / "final" / "config.json").is_file():
        return f"no trained {stage} UNet in {root / stage / 'final'}; run `python -m asyncvid.training {stage}` first"
    vae = _stage_vae(root, stage)
    if not (vae / "config.json").is_file() and vae.parent.name == stage:  # a fine-tune whose copy is gone
        return (f"no VAE for {stage} in {vae}, where its fine-tune keeps the one it started from; run `python -m "
                f"asyncvid.training {stage} --init-from FOLDER --fresh` with this --workdir again")
    if not (vae / "config.json").is_file():
        return f"no VAE for {stage} in {vae}; run `python -m asyncvid.training vae` with this --workdir first"
    return None


def export_all(root: Path, dest: Path | None = None, scores: dict | None = None,
               stages: tuple[str, ...] = tuple(NAMES)) -> list[Path]:
    """Write tiny-animatediff and tiny-svd (or those of `stages`) under `dest`, each replaced whole (written aside,
    then renamed)."""
    unknown = sorted(set(stages) - set(NAMES))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)} to export; choose from {', '.join(NAMES)}")
    dest = Path(dest or default_dest())
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    for stage, assemble, vae_stage in (("animatediff", assemble_animatediff, "vae"), ("svd", assemble_svd, "vae")):
        if stage not in stages:
            continue
        name = NAMES[stage]
        pipe = assemble(root).to(dtype=torch.float16)
        # A VAE brought from elsewhere (a shipped folder copied to vae/final) has no log, and a fine-tune ships the
        # VAE it started from (its card names that folder): either way the VAE stage's row is left out.
        logs = {stage: json.loads((root / stage / "train_log.json").read_text())}
        if (vae_log := root / vae_stage / "train_log.json").is_file() and not logs[stage].get("init_from"):
            logs = {vae_stage: json.loads(vae_log.read_text()), **logs}
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=dest))
        pipe.save_pretrained(tmp, safe_serialization=True)
        _forget_training_paths(tmp)
        # What it is sampled with unless the user says otherwise.
        if stage == "animatediff":
            sampling_defaults.write(tmp, guidance_scale=GUIDANCE, shared_noise=SHARED_NOISE, noise_mean=NOISE_MEAN,
                                    shared_grid=SHARED_GRID)
        else:
            sampling_defaults.write(tmp, max_guidance_scale=MAX_GUIDANCE, shared_noise=SVD_SHARED_NOISE,
                                    noise_mean=SVD_NOISE_MEAN)
        (tmp / "README.md").write_text(model_card(name, pipe, logs, (scores or {}).get(name)))
        target = dest / name
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
        written.append(target)
    return written


def _forget_training_paths(folder: Path) -> None:
    """Drop `_name_or_path` (the training folder each part was loaded from) from the configs: it names a folder on
    the machine that trained the model, and means nothing on a user's."""
    for config in folder.glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _round_trip(vae_log: dict) -> str:
    """The VAE's round-trip adherence from its log (logs from before it was recorded have none)."""
    rt = vae_log.get("round_trip")
    if not rt:
        return ""
    return (f"; its round trip of the held-out clips keeps colour {rt['colour']:g}%, shape {rt['shape']:g}% and "
            f"direction {rt['direction']:g}% (the ceiling of what the UNet can show)")


def _backdrop(logs: dict) -> str:
    """What the UNet's clips were drawn over: one plain tone (`animatediff --background`, round 32) or any."""
    tones = {log["background"] for log in logs.values() if log.get("background") is not None}
    starts = sorted({(log["init_from"], log.get("init_unet_sha256")) for log in logs.values() if log.get("init_from")})
    # A fine-tune's log knows only its own clips; the model it started from saw its own (its card says which).
    start = "".join(f", fine-tuned from the model then in `{folder}`"
                    + (f" (UNet weights sha256 {sha[:12]})" if sha else "") + " (its own card says what it saw)"
                    for folder, sha in starts)
    if not tones:
        return "a plain, striped or graded background" + start
    return " or ".join(f"the plain tone {BACKGROUNDS[t]} (RGB)" for t in sorted(tones)) + ", every clip" + start


def model_card(name: str, pipe, logs: dict, scores: dict | None) -> str:
    """A short card: what the model is, what it saw, how it was trained and how well it follows prompts."""
    unet = pipe.unet
    params = sum(p.numel() for p in unet.parameters())
    lines = [
        f"# {name}", "",
        "A tiny model trained on procedural clips, so that asyncvid's embedded default shows the prompt as motion and "
        "parallel samplers can be scored for what they cost in quality. Not a general video model.", "",
        "## Training data", "",
        f"Clips from `asyncvid.eval.clips` (64x64): one shape ({', '.join(SHAPES)}) in one of {len(COLOURS)} colours "
        f"({', '.join(COLOURS)}) moving {', '.join(DIRECTIONS)} over {_backdrop(logs)}. "
        f"Trained on {len(training_captions())} of the {len(training_captions()) + len(heldout_captions())} "
        "caption combinations; the other 50 are held out (`samples/heldout_prompts.txt`).", "",
        "## Model", "",
        f"- UNet: `{type(unet).__name__}`, block_out_channels {list(unet.config.block_out_channels)}, "
        f"{unet.config.layers_per_block} layers per block, {params / 1e6:.2f}M parameters",
        f"- VAE: `{type(pipe.vae).__name__}`, block_out_channels {list(pipe.vae.config.block_out_channels)}, "
        f"{pipe.vae.config.layers_per_block} layers per block, scaling factor {pipe.vae.config.scaling_factor}"
        + _round_trip(logs.get("vae", {})),
        "- Weights stored in float16; asyncvid loads them in the run's dtype.", "",
        "## Training", "",
        "`python -m asyncvid.training all` (or the stages `vae`, `svd-vae`, `animatediff`, `svd`, `export`); "
        "see docs/MODELS.md.", "",
        "| stage | steps | minutes | final loss (mean of last 100) | batch | lr | seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage, log in logs.items():
        cfg = log["config"]
        lines.append(f"| {stage} | {log['steps']} | {log['minutes']} | {log['final_loss']} | {cfg['batch']} | "
                     f"{cfg['lr']} | {cfg['seed']} |")
    for stage, log in logs.items():
        recipe = {k: log[k] for k in ("schedule", "snr_cap", "mean_share", "train_text", "text_layers", "text_positions",
                                      "high_noise", "phases", "object_gain", "shared_noise", "image_stage",
                                      "motion_gain", "spatial_gain", "shape_pairs", "colour_pairs", "partial_captions",
                                      "flicker_gain", "brightness_gain", "brightness_below", "brightness_margin",
                                      "noise_mean", "background", "init_from", "init_unet_sha256", "train_image_encoder") if k in log}
        if recipe:
            lines += ["", f"{stage} recipe (from its training log): `{json.dumps(recipe)}`"]
    lines += ["", "## Adherence", ""]
    if scores:
        lines.append(scores["text"] if "text" in scores else json.dumps(scores))
    else:
        lines.append("Not scored yet; run `python -m asyncvid.evaluate` on generated outputs.")
    return "\n".join(lines) + "\n"
