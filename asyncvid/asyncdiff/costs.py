"""Per-unit cost of a UNet: FLOPs and output sizes (traced on meta tensors), or measured wall time."""

from __future__ import annotations

import contextlib
import functools
import statistics
import time

import torch

from asyncvid.asyncdiff.trace import Trace, UnitProfile, registered, trace, unit_hook
from asyncvid.asyncdiff.units import Program

TIMING_HOOK = "asyncvid.asyncdiff.timing"
__all__ = ["UnitProfile", "fake_profile", "fake_trace", "measure_times", "skeleton"]


def skeleton(unet: torch.nn.Module) -> torch.nn.Module:
    """A UNet of the same config with no weights (meta): what planning traces, whatever add-ons `unet` carries."""
    with torch.device("meta"):
        return type(unet).from_config(unet.config).eval()


def fake_trace(unet: torch.nn.Module, family, shape: dict, *, flops: bool = True) -> Trace:
    """The program and per-unit profiles (with `flops`, FLOPs; weight and output bytes) of `unet`'s architecture
    called as `family`'s pipeline calls it at `shape`: shapes only, no memory, any size."""
    model = skeleton(unet)
    with torch.device("meta"):
        args, kwargs = family.example_inputs(model, **shape)
    return trace(model, args, kwargs, flops=flops)


def fake_profile(unet: torch.nn.Module, family, shape: dict) -> list[UnitProfile]:
    return fake_trace(unet, family, shape).profiles


def measure_times(unet: torch.nn.Module, program: Program, args, kwargs, repeats: int = 3,
                  materialise=None) -> list[float]:
    """Median wall time of each unit on the inputs' device, in one run of the UNet's own forward: each unit runs
    `repeats` + 1 times on its input (the first warms up) inside `materialise(i)`, a context in which unit i's
    weights exist (default: they do)."""
    device = next(a.device for a in args if torch.is_tensor(a))
    times = [0.0] * len(program.units)

    def timed(i, forward, a, k):
        runs = []
        with materialise(i) if materialise is not None else contextlib.nullcontext():
            for _ in range(repeats + 1):
                _sync(device)
                start = time.perf_counter()
                out = forward(*a, **k)
                _sync(device)
                runs.append(time.perf_counter() - start)
        times[i] = statistics.median(runs[1:])
        return out

    hooks = [(u.name, unit_hook(functools.partial(timed, i))) for i, u in enumerate(program.units)]
    with registered(unet, hooks, TIMING_HOOK), torch.inference_mode():
        unet(*args, **kwargs)
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
