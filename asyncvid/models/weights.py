"""A UNet's weights on disk: its safetensors files, and its skeleton with every parameter on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights

from asyncvid.errors import UsageError

WEIGHTS = "diffusion_pytorch_model.safetensors"


def skeleton(unet_class, folder: Path) -> torch.nn.Module:
    """The UNet with every parameter on the meta device (buffers stay real: they are computed, not loaded)."""
    with init_empty_weights(include_buffers=False):
        return unet_class.from_config(unet_class.load_config(folder)).eval()


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a diffusers model folder, sharded or not, ignoring dtype variants."""
    index = folder / f"{WEIGHTS}.index.json"
    if index.is_file():
        return sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    if (folder / WEIGHTS).is_file():
        return [folder / WEIGHTS]
    raise UsageError(f"'{folder}' has no {WEIGHTS}; stage-parallel loading reads safetensors weights only")
