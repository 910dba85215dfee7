"""Choosing the torch device and dtype: CUDA when present, the CPU otherwise, and a dtype that suits each."""

from __future__ import annotations

import torch

from asyncvid.errors import UsageError

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(spec: str | None) -> torch.device:
    """`None` picks cuda when available, else cpu; an explicit device must exist."""
    if spec is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"device '{spec}' is not a torch device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device '{spec}' requested but no CUDA GPU is visible; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"device '{spec}' does not exist: {torch.cuda.device_count()} GPU(s) are visible")
    return device


def resolve_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """`None` means float16 on CUDA (the pipelines' usual precision) and float32 on the CPU."""
    if spec is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise UsageError(f"dtype '{spec}' is not supported; use one of {', '.join(DTYPES)}")
    if spec == "float16" and device.type == "cpu":
        raise UsageError("dtype float16 is not supported on the CPU; use --dtype bfloat16 or float32")
    return DTYPES[spec]
