"""What `asyncvid bench` measures: the validated config, the one request every configuration samples, and the grid."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.bench.runs import Entry
from asyncvid.errors import UsageError
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines import adapter_for, resolve_model, svd
from asyncvid.pipelines.embedded import cache_root
from asyncvid.requests import ImageToVideo, TextToVideo

STAGE_COUNTS = (2, 3, 4)
STRIDES = (1, 2)


@dataclass(frozen=True)
class BenchConfig:
    """What `asyncvid bench` measures; validated on construction."""

    models: tuple[str, ...] = ("tiny-svd", "tiny-animatediff")
    size: int = 128  # frame height and width (16x16 latents)
    frames: int = 8
    steps: int = 25
    warmups: tuple[int, ...] = (1, 3, 6)
    repeats: int = 3
    cfg_parallel: bool = True
    parataa: bool = True
    parataa_models: tuple[str, ...] | None = ("tiny-animatediff",)  # None: every model (slow on a CPU)
    device: str = "cpu"
    out: Path = Path("outputs/bench")  # the project's own docs/ is regenerated with an explicit --out docs
    adherence: bool = False
    adherence_only: bool = False  # refresh only the adherence section of an existing benchmarks.json
    repredict: bool = False  # re-measure the cost model's inputs and redo the predictions of an existing one
    adherence_model: str = "tiny-animatediff"  # a trained text-to-video model: adherence of random weights is noise
    adherence_prompts: int = 50
    adherence_warmups: tuple[int, ...] = (1, 3)
    adherence_parataa_prompts: int = 10
    link_gbps: float | None = None  # override the measured link for the projections (GB/s)
    link_latency_us: float | None = None
    busy: bool = True  # on a CPU, also time the units with every core computing (what a parallel run's ranks see)
    full_size: bool = True  # project to the full-size SVD-xt and AnimateDiff UNets
    plots: bool = True
    command: str = "asyncvid bench"

    def __post_init__(self):
        if self.size < 64 or self.size % 64:
            raise UsageError(f"size must be a multiple of 64 (parallel stages need latents divisible by 8), got "
                             f"{self.size}")
        if self.steps < 2 or self.frames < 1:
            raise UsageError(f"steps must be >= 2 and frames >= 1, got steps={self.steps}, frames={self.frames}")
        if self.repeats < 1:
            raise UsageError(f"repeats must be >= 1 (3 gives a median of 3 after a warm-up run), got {self.repeats}")
        bad = [w for w in self.warmups if not 1 <= w <= self.steps]
        if bad:
            raise UsageError(f"warm-ups must be between 1 and steps={self.steps}, got {bad}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"device must be cpu or cuda, got {self.device!r}")


def request_for(model: str, config: BenchConfig):
    """The one request every configuration samples: image-to-video for SVD models, text-to-video otherwise."""
    common = dict(num_frames=config.frames, height=config.size, width=config.size,
                  num_inference_steps=config.steps)
    if adapter_for(resolve_model(model)) is svd:
        return ImageToVideo(sample_image(), **common)
    return TextToVideo("a red circle moving left", **common)


def grid(config: BenchConfig, cores: int, model: str) -> list[Entry]:
    """Sequential on 1 thread and on every core, AsyncDiff N=2 at each warm-up, CFG-parallel, ParaTAA on 2 ranks."""
    each = max(1, cores // 2)
    entries = [Entry("sequential, 1 thread", "sequential", 1, 1),
               Entry(f"sequential, {cores} threads", "sequential", 1, cores)]
    entries += [Entry(f"AsyncDiff N=2 S=1 warm-up {w}", "asyncdiff", 2, each, AsyncDiffConfig(stages=2, warmup=w))
                for w in config.warmups]
    if config.cfg_parallel:
        entries.append(Entry("CFG-parallel (guidance halves on 2 ranks)", "cfg-parallel", 2, each,
                             AsyncDiffConfig(stages=1, warmup=1, cfg_parallel=True)))
    if config.parataa and (config.parataa_models is None or model in config.parataa_models):
        entries.append(Entry("ParaTAA on 2 ranks", "parataa", 2, each, ParaTAAConfig()))
    if config.device.startswith("cuda"):  # one GPU per rank: leave out what this machine cannot place
        entries = [e for e in entries if e.processes <= torch.cuda.device_count()]
    return entries




def sample_image() -> Path:
    """The conditioning image of the image-to-video runs: samples/red_circle.png, drawn here because an installed
    package has no samples/ folder; written once into the model cache."""
    path = cache_root() / "bench" / "red_circle.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", (64, 64), (235, 235, 220))
        ImageDraw.Draw(image).ellipse((14, 22, 34, 42), fill=(210, 40, 40))
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)  # atomic: ranks and benchmark processes may draw it at once
    return path
