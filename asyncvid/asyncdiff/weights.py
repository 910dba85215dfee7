"""A rank's share of the UNet: an empty skeleton (asyncvid.models.weights) filled only with the tensors of its stage's
modules and the shared ones, read one by one from safetensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import set_module_tensor_to_device

from asyncvid.errors import UsageError


def owned(name: str, modules: list[str]) -> bool:
    return any(name == m or name.startswith(m + ".") for m in modules)


# safetensors' dtype names: https://github.com/huggingface/safetensors (the format's README)
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
          "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
          "U8": torch.uint8, "BOOL": torch.bool}


def read_tensors(path: Path, wanted):
    """(name, tensor) for each tensor of a safetensors file that `wanted(name)` accepts, read with plain reads: a
    memory-mapped file's touched pages count toward the process's resident memory while it is open (2.2 GB at
    SVD-xt's larger stage), read pages only toward the page cache, which a rank does not hold."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        for name, info in header.items():
            if name == "__metadata__" or not wanted(name):
                continue
            start, end = info["data_offsets"]
            data = bytearray(end - start)
            f.seek(8 + size + start)
            if f.readinto(data) != len(data):
                raise UsageError(f"weights file '{path}' ends inside tensor '{name}': it is truncated; download or "
                                 f"save the model again")
            if info["dtype"] not in DTYPES:
                raise UsageError(f"weights file '{path}' holds '{name}' as {info['dtype']}, which asyncvid does not "
                                 f"read; save the model in float32, float16 or bfloat16")
            dtype = DTYPES[info["dtype"]]
            yield name, (torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)).reshape(
                info["shape"])


def load_owned(unet: torch.nn.Module, files: list[Path], modules: list[str] | None, *, device, dtype) -> None:
    """Materialise the tensors under `modules` (None: all) from safetensors `files`, read one tensor at a time (a
    later file's tensor replaces an earlier one's: an adapter's motion modules over a folder's); the rest stays on
    meta."""
    filled, known = set(), set(unet.state_dict())
    for path in files:
        # A key the UNet lacks is skipped, as diffusers' load_motion_modules skips an adapter's mid-block motion
        # modules for a UNet without one; a tensor it needs and no file has is named below.
        for key, value in read_tensors(path, lambda key: key in known and (modules is None or owned(key, modules))):
            set_module_tensor_to_device(unet, key, device, value=value, dtype=dtype)
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
