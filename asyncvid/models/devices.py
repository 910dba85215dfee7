"""Choosing the torch device and dtype: CUDA when present, the CPU otherwise, and a dtype that suits each."""

from __future__ import annotations

import time

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


def synchronize(device: torch.device | None) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously, so the host clock runs ahead of it)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class Stopwatch:
    """Seconds spent in timed sections: the host clock on the CPU, CUDA events on a GPU, whose queued work the host
    clock would not see; reading `seconds` synchronises once, not every section."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self._seconds = 0.0
        self._pending: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def start(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def stop(self, start) -> None:
        if not self.cuda:
            self._seconds += time.perf_counter() - start
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._pending.append((start, end))

    @property
    def seconds(self) -> float:
        if self._pending:
            self._pending[-1][1].synchronize()
            self._seconds += sum(a.elapsed_time(b) for a, b in self._pending) / 1000.0
            self._pending.clear()
        return self._seconds
