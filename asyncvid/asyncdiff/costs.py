"""Per-unit cost of a UNet: FLOPs and output sizes (traced on meta tensors), or measured wall time."""

from __future__ import annotations

import contextlib
import functools
import json
import statistics
import time

import torch

from asyncvid.asyncdiff.trace import Trace, UnitProfile, registered, trace, unit_hook
from asyncvid.asyncdiff.units import Program
from asyncvid.models.weights import empty_model

TIMING_HOOK = "asyncvid.asyncdiff.timing"
__all__ = ["UnitProfile", "fake_profile", "fake_trace", "measure_times", "skeleton"]


def skeleton(unet: torch.nn.Module) -> torch.nn.Module:
    """A UNet of the same config with no weights (meta): what planning traces, whatever add-ons `unet` carries."""
    return empty_model(type(unet), unet.config, real_buffers=False)


def fake_trace(unet: torch.nn.Module, family, shape: dict, *, flops: bool = True) -> Trace:
    """The program and per-unit profiles (with `flops`, FLOPs; weight and output bytes) of `unet`'s architecture
    called as `family`'s pipeline calls it at `shape`: shapes only, no memory, any size."""
    key = (type(unet), json.dumps(public_config(unet.config), sort_keys=True, default=str), family,
           json.dumps(shape, sort_keys=True, default=str))
    traced, counted = _TRACES.pop(key, (None, False))
    if traced is None or (flops and not counted):
        model = skeleton(unet)
        with torch.device("meta"):
            args, kwargs = family.example_inputs(model, **shape)
        traced, counted = trace(model, args, kwargs, flops=flops), flops
    _TRACES[key] = traced, counted  # the latest last: the oldest goes first
    while len(_TRACES) > TRACES_KEPT:
        _TRACES.pop(next(iter(_TRACES)))
    return Trace(traced.program, dict(traced.structures), list(traced.profiles))


# The traces last made in this process, by architecture and shape: a trace is a function of those alone (the
# skeleton carries no weights or add-ons) and costs seconds of torch's Python meta kernels on a real UNet, while
# a process that loads and splits a model again (a worker pool's next request, each run of a batch) traces it
# again at setup, for its measured costs and for its oracle.
TRACES_KEPT = 8
_TRACES: dict[tuple, tuple[Trace, bool]] = {}  # key -> (trace, whether it counted FLOPs)


def public_config(config) -> dict:
    """A config without its private entries: `_use_default_values` of a model built in code lists a set, in an
    order that differs between processes."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


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
