"""A rank's share of the UNet: an empty skeleton (asyncvid.models.weights) filled only with the tensors of its stage's
modules and the shared ones, read one by one from safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open

from asyncvid.errors import UsageError
from asyncvid.models.weights import weight_files


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


def move_materialised(module: torch.nn.Module, device) -> None:
    """Move every parameter and buffer that is not on the meta device to `device` (Module.to fails on meta ones)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_meta:
            set_module_tensor_to_device(module, name, device)


def materialised_share(unet: torch.nn.Module) -> float:
    """The fraction of the UNet's parameters this rank holds in memory."""
    total = sum(p.numel() for p in unet.parameters())
    return sum(p.numel() for p in unet.parameters() if not p.is_meta) / total
