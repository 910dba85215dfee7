"""A rank's share of the UNet: an empty skeleton (accelerate's init_empty_weights) filled only with the tensors of
its stage's modules and the shared ones, read one by one from safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open

from .errors import UsageError

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


def owned(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_owned(unet: torch.nn.Module, folder: Path, modules: list[str], *, device, dtype) -> None:
    """Materialise the tensors under `modules` from `folder`'s safetensors; everything else stays on meta."""
    for path in weight_files(folder):
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if owned(key, modules):
                    set_module_tensor_to_device(unet, key, device, value=f.get_tensor(key), dtype=dtype)
    missing = [n for n, p in unet.named_parameters() if p.is_meta and owned(n, modules)]
    if missing:
        raise UsageError(f"'{folder}' lacks weights for {missing[0]} (and {len(missing) - 1} more); re-save the model")


def release_unowned(unet: torch.nn.Module, modules: list[str]) -> None:
    """Drop every parameter outside `modules` to the meta device (for models that had to load whole)."""
    for name, param in list(unet.named_parameters()):
        if not owned(name, modules) and not param.is_meta:
            set_module_tensor_to_device(unet, name, "meta")


def materialised_share(unet: torch.nn.Module) -> float:
    """The fraction of the UNet's parameters this rank holds in memory."""
    total = sum(p.numel() for p in unet.parameters())
    return sum(p.numel() for p in unet.parameters() if not p.is_meta) / total
