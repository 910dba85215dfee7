"""The benchmark's grid: the one request every configuration samples, its conditioning image, and the entries."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.bench.config import BenchConfig
from asyncvid.bench.runs import Entry
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines import adapter_for, resolve_model, svd
from asyncvid.pipelines.embedded import cache_root
from asyncvid.requests import ImageToVideo, TextToVideo


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
