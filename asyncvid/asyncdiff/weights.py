"""A rank's share of the UNet: an empty skeleton (asyncvid.models.weights) filled only with the tensors of its stage's
modules and the shared ones, read one by one from safetensors."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open

from asyncvid.errors import UsageError


def owned(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


def load_owned(unet: torch.nn.Module, files: list[Path], modules: list[str] | None, *, device, dtype) -> None:
    """Materialise the tensors under `modules` (None: all) from safetensors `files`, read one tensor at a time (a
    later file's tensor replaces an earlier one's: an adapter's motion modules over a folder's); the rest stays on
    meta."""
    filled = set()
    for path in files:
        with safe_open(path, framework="pt", device="cpu") as f:
            for key in f.keys():
                if modules is None or owned(key, modules):
                    set_module_tensor_to_device(unet, key, device, value=f.get_tensor(key), dtype=dtype)
                    filled.add(key)
    missing = [n for n, _ in unet.named_parameters() if n not in filled and (modules is None or owned(n, modules))]
    if missing:
        where = " and ".join(sorted({str(p.parent) for p in files}))
        raise UsageError(f"'{where}' lacks weights for {missing[0]} (and {len(missing) - 1} more); re-save the model")


def move_materialised(module: torch.nn.Module, device) -> None:
    """Move every parameter and buffer that is not on the meta device to `device` (Module.to fails on meta ones)."""
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_meta:
            set_module_tensor_to_device(module, name, device)


def materialised_share(unet: torch.nn.Module) -> float:
    """The fraction of the UNet's parameters this rank holds in memory."""
    total = sum(p.numel() for p in unet.parameters())
    return sum(p.numel() for p in unet.parameters() if not p.is_meta) / total
