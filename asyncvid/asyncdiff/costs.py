"""Per-unit cost of a unit program: FLOPs and boundary tensor sizes (on fake tensors), or measured wall time."""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from asyncvid.asyncdiff.units import Program, skip_wiring


@dataclass(frozen=True)
class UnitProfile:
    """What one unit costs and produces: FLOPs, weight bytes, and its output's shape and bytes."""

    name: str
    flops: int
    param_bytes: int
    out_shape: tuple[int, ...]
    out_bytes: int


def _walk(program: Program, args, kwargs, around: Callable[[int], object]):
    """Run the program unit by unit, each inside the context manager `around(i)`; yields (i, output)."""
    pops, _ = skip_wiring(program.units)
    with torch.inference_mode():
        ctx, h = program.prologue(*args, **kwargs)
        skips: dict[int, torch.Tensor] = {}
        for i, unit in enumerate(program.units):
            with around(i):
                h = unit.run(ctx, h, skips.pop(pops[i]) if unit.pops else None)
            if unit.pushes:
                skips[i] = h
            yield i, h


def profile(program: Program, unet: torch.nn.Module, args, kwargs) -> list[UnitProfile]:
    """FLOPs (matmuls, convolutions, attention) and output sizes of each unit for these inputs."""
    counters = {}

    def around(i):
        counters[i] = FlopCounterMode(display=False)
        return counters[i]

    profiles = []
    for i, out in _walk(program, args, kwargs, around):
        unit = program.units[i]
        weights = sum(p.numel() * p.element_size() for m in unit.owned for p in unet.get_submodule(m).parameters())
        profiles.append(UnitProfile(unit.name, counters[i].get_total_flops(), weights, tuple(out.shape),
                                    out.numel() * out.element_size()))
    return profiles


def fake_profile(build_unet: Callable[[], torch.nn.Module], build_program, example_inputs) -> list[UnitProfile]:
    """Profile a UNet of any size without memory: weights and activations are fake tensors (shapes only)."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        unet = build_unet().eval()
        args, kwargs = example_inputs(unet)
        return profile(build_program(unet), unet, args, kwargs)


def measure_times(program: Program, args, kwargs, repeats: int = 3, materialise=None) -> list[float]:
    """Median wall time of each unit on the inputs' device: each unit runs `repeats` + 1 times on its input (the
    first warms up) inside `materialise(i)`, a context in which unit i's weights exist (default: they do)."""
    device = args[0].device
    pops, _ = skip_wiring(program.units)
    times = []
    with torch.inference_mode():
        ctx, h = program.prologue(*args, **kwargs)
        skips: dict[int, torch.Tensor] = {}
        for i, unit in enumerate(program.units):
            skip = skips.pop(pops[i]) if unit.pops else None
            runs = []
            with materialise(i) if materialise is not None else contextlib.nullcontext():
                for _ in range(repeats + 1):
                    _sync(device)
                    start = time.perf_counter()
                    out = unit.run(ctx, h, skip)
                    _sync(device)
                    runs.append(time.perf_counter() - start)
            h = out
            if unit.pushes:
                skips[i] = h
            times.append(statistics.median(runs[1:]))
    return times


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

