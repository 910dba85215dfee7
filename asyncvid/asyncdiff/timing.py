"""Measured unit costs without a copy of the model: each unit's weights exist (stand-ins) only while it is timed, at a
shape small enough to time quickly, scaled to the real shape by FLOPs, and kept in the cost cache."""

from __future__ import annotations

import contextlib
import functools
import math

import torch
from accelerate.utils import set_module_tensor_to_device

from asyncvid.asyncdiff.cost_cache import cached, key
from asyncvid.asyncdiff.costs import UnitProfile, fake_profile, measure_times
from asyncvid.asyncdiff.weights import owned
from asyncvid.models.weights import empty_model

# FLOPs of one UNet call that are timed as they are; a larger shape is timed smaller and scaled by FLOPs. Large
# enough that the units compute rather than wait on their weights (at SVD-xt's smallest shape, 7e10 FLOPs, the
# weight-heavy low-resolution units measured as the slowest and the split shared the weights evenly; at full size
# FLOPs dominate): on the CPU (50-100 GFLOP/s on two cores) 10-20 s per call, each unit run twice (a warm-up and
# one timed run: at that size one run is steady); on a GPU, milliseconds.
BUDGET = {"cpu": 1e12, "cuda": 2e13}


def measure_unit_costs(unet, family, shape: dict, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Seconds per unit of `unet` (its skeleton suffices) at `shape`, on `device` in `dtype`: from the cache when
    timed before on this machine (then nothing is built or run), else timed and stored."""
    with torch.device("meta"):  # the inputs' shapes, for the cache key, cost nothing
        args, kwargs = family.example_inputs(unet, **shape)
    shapes = [list(a.shape) if torch.is_tensor(a) else a for a in (*args, *kwargs.values())]
    # Measured once per machine and shape, then reused: the same split on every rerun gives the same frames.
    measure = functools.partial(time_scaled, unet, family, shape, device, dtype)
    return cached(key(dict(unet.config), shapes, device, dtype), measure)


def time_scaled(unet, family, shape: dict, device: torch.device, dtype: torch.dtype) -> list[float]:
    """Time the units at `shape`, or at a smaller shape within BUDGET scaled unit by unit by FLOPs (by output bytes
    for units without matmuls): compute time does not depend on the weights' values, and grows with FLOPs."""
    full = _profile(unet, family, shape)
    small_shape = reduced(shape, sum(p.flops for p in full), BUDGET.get(device.type, BUDGET["cuda"]), unet, family)
    if small_shape == shape:
        return time_units(unet, family, shape, device, dtype)
    times = time_units(unet, family, small_shape, device, dtype, repeats=1)
    return scale_times(times, _profile(unet, family, small_shape), full)


def scale_times(times: list[float], small: list[UnitProfile], full: list[UnitProfile]) -> list[float]:
    """Unit times measured at a small shape, scaled to the full one by each unit's FLOPs (or output bytes)."""
    return [t * (f.flops / s.flops if s.flops else f.out_bytes / max(s.out_bytes, 1))
            for t, s, f in zip(times, small, full)]


def reduced(shape: dict, flops: float, budget: float, unet, family) -> dict:
    """`shape` with fewer frames (down to 2), then a smaller latent (each side a multiple of 8, a 4-level UNet's
    need, down to 8), until FLOPs, taken as proportional to frames x pixels, fit `budget`."""
    if flops <= budget:
        return shape
    with torch.device("meta"):
        sample = family.example_inputs(unet, **shape)[0][0]
    scale = shape.get("scale", 8)
    frames, h, w = sample.shape[family.frame_dim], sample.shape[-2], sample.shape[-1]
    fewer = max(min(2, frames), min(frames, math.ceil(frames * budget / flops)))
    flops *= fewer / frames
    side = min(1.0, math.sqrt(budget / flops))
    h2, w2 = (max(8, int(n * side) // 8 * 8) if n >= 8 else n for n in (h, w))
    return dict(shape, frames=fewer, height=h2 * scale, width=w2 * scale)


def time_units(unet, family, shape: dict, device: torch.device, dtype: torch.dtype, repeats: int = 3) -> list[float]:
    """Median seconds per unit on an empty skeleton whose shared modules hold stand-in weights throughout, and each
    unit's own only while it runs, in one buffer the size of the largest unit's: memory stays near that, whatever
    the model's size (tensor-by-tensor allocations left 1.7 GB of freed heap behind for SVD-xt's 0.4 GB units)."""
    model = empty_model(type(unet), unet.config)
    for name, buffer in list(model.named_buffers()):  # computed at construction; in the run's dtype, as a run's are
        dtype_of = dtype if buffer.is_floating_point() else buffer.dtype
        set_module_tensor_to_device(model, name, device, value=buffer, dtype=dtype_of)
    program = family.build_program(model)
    args, kwargs = family.example_inputs(model, **shape)
    args = tuple(_to(a, device, dtype) for a in args)
    arena = torch.empty(max(_arena_size(model, unit.owned) for unit in program.units), device=device, dtype=dtype)
    shared = torch.empty(_arena_size(model, list(program.shared)), device=device, dtype=dtype)
    with stand_in_weights(model, list(program.shared), shared):
        return measure_times(model, program, args, kwargs, repeats=repeats,
                             materialise=lambda i: stand_in_weights(model, program.units[i].owned, arena))


@contextlib.contextmanager
def stand_in_weights(model: torch.nn.Module, modules: list[str], arena: torch.Tensor):
    """The meta parameters under `modules` as views of `arena` holding stand-in values (compute time does not depend
    on them; these neither overflow nor make denormals, which slow a CPU), back on meta after."""
    filled, offset = [], 0
    for name, param in model.named_parameters():
        if param.is_meta and owned(name, modules):
            value = arena[offset:offset + param.numel()].view(param.shape)
            value.fill_(value_fill(name, param.shape))  # a constant: memory speed (random numbers took longer)
            # dtype given: accelerate casts a value to the skeleton's dtype (float32) otherwise, copying it
            set_module_tensor_to_device(model, name, arena.device, value=value, dtype=arena.dtype)
            filled.append(name)
            offset += _aligned(param.numel())
    try:
        yield
    finally:
        for name in filled:
            set_module_tensor_to_device(model, name, "meta")


def _aligned(numel: int) -> int:
    """Elements up to the next 256-byte boundary (float32): an unaligned view ran SVD-xt's units 10x slower."""
    return -(-numel // 64) * 64


def _arena_size(model: torch.nn.Module, modules: list[str]) -> int:
    return sum(_aligned(p.numel()) for n, p in model.named_parameters() if owned(n, modules))


def value_fill(name: str, shape: torch.Size) -> float:
    """Mean-preserving weights (1/fan-in), norms at one, biases at zero."""
    if len(shape) > 1:
        return 1.0 / math.prod(shape[1:])
    return 1.0 if name.endswith("weight") else 0.0


def _profile(unet, family, shape: dict) -> list[UnitProfile]:
    return fake_profile(unet, family, shape)


def _to(value, device, dtype):
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    return value
