"""The unit program of any diffusers UNet, read off one run of its own forward on meta tensors (shapes, no data).

Candidate units are the members of each block's module lists (resnets, attentions, motion modules, samplers) and the
UNet's own layers (conv_in, conv_out). Every tensor carries the set of unit outputs it was computed from, carried
through each torch operation between units (the UNet's glue), so a unit's `needs` are exactly what its input was
made of: the previous unit's output, a skip, or several. A candidate whose input comes from no unit and not from
the sample (time and condition embeddings) is shared, computed on every rank.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.nn.utils.stateless import _reparametrize_module
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.flop_counter import FlopCounterMode

from asyncvid.asyncdiff.units import Block, Key, Program, Unit
from asyncvid.errors import UsageError

INPUT: Key = (-1, 0)  # the UNet's `sample` argument
_SOURCES = "_asyncvid_sources"  # the attribute on a traced tensor holding its sources
TRACE_HOOK = "asyncvid.asyncdiff.trace"


@dataclass(frozen=True)
class UnitProfile:
    """What one unit costs and produces: FLOPs, weight bytes, its output's (first tensor's) shape and bytes, and
    (shape, bytes) of each tensor of its output."""

    name: str
    flops: int
    param_bytes: int
    out_shape: tuple[int, ...]
    out_bytes: int
    leaves: tuple[tuple[tuple[int, ...], int], ...] = ()


@dataclass(frozen=True)
class Structure:
    """The shape of a module's output: its pytree, and (shape, dtype) of each tensor or the value of anything else."""

    spec: TreeSpec
    leaves: tuple

    @classmethod
    def of(cls, output) -> Structure:
        leaves, spec = tree_flatten(output)
        return cls(spec, tuple(("tensor", tuple(x.shape), x.dtype) if torch.is_tensor(x) else ("value", x)
                               for x in leaves))

    def build(self, tensor: Callable[[int, tuple, torch.dtype], torch.Tensor]):
        """An output of this structure whose leaf l is `tensor(l, shape, dtype)`."""
        return tree_unflatten([tensor(i, leaf[1], leaf[2]) if leaf[0] == "tensor" else leaf[1]
                               for i, leaf in enumerate(self.leaves)], self.spec)


@dataclass
class Trace:
    """A traced UNet call: its program, the output structure of each unit and block (by name), each unit's profile."""

    program: Program
    structures: dict[str, Structure]
    profiles: list[UnitProfile]


def parts(unet: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(candidate units, blocks) by module name: each block's list members, and the UNet's own layers with weights."""
    candidates, blocks = [], []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                blocks.append(f"{name}.{i}")
                candidates += _list_members(f"{name}.{i}", block)
        elif _list_members(name, child):
            blocks.append(name)
            candidates += _list_members(name, child)
        elif any(True for _ in child.parameters()):
            candidates.append(name)
    return candidates, blocks


def _list_members(prefix: str, module: torch.nn.Module) -> list[str]:
    return [f"{prefix}.{n}.{j}" for n, child in module.named_children() if isinstance(child, torch.nn.ModuleList)
            for j in range(len(child))]


def trace(unet: torch.nn.Module, args, kwargs, *, forward: Callable | None = None, flops: bool = False) -> Trace:
    """Run `forward` (default: the UNet's) once on meta copies of the inputs and weights, recording the units, their
    sources and output structures, and with `flops` each unit's FLOPs. Nothing is computed or allocated."""
    forward = forward or unet.forward
    candidates, block_names = parts(unet)
    tracer = _Tracer(flops)
    metas = {name: _meta(t) for name, t in itertools.chain(unet.named_parameters(), unet.named_buffers())}
    margs, mkwargs = tree_map(_meta, (tuple(args), dict(kwargs)))
    sample = margs[0] if margs else mkwargs["sample"]
    setattr(sample, _SOURCES, frozenset({INPUT}))
    hooked = [(name, _Hook(lambda fwd, a, k, name=name: tracer.unit(name, fwd, a, k))) for name in candidates]
    hooked += [(name, _Hook(lambda fwd, a, k, name=name: tracer.block(name, fwd, a, k))) for name in block_names]
    with registered(unet, hooked, TRACE_HOOK), torch.no_grad(), _reparametrize_module(unet, metas), tracer.mode:
        try:
            out = forward(*margs, **mkwargs)
        except RuntimeError as e:  # on shapes alone: the same call fails in the sequential pipeline too
            raise UsageError(f"{type(unet).__name__} cannot take a sample of shape {tuple(sample.shape)} "
                             f"({str(e).splitlines()[0]}); choose a height and width the model supports") from e
    units = tuple(tracer.units)
    blocks = tuple(Block(name, *_span(units, name)) for name in block_names if name in tracer.structures)
    program = Program(units, shared_modules(unet, units), tuple(b for b in blocks if b.start < b.stop),
                      tuple(sorted(_sources(out) - {INPUT})), None if isinstance(out, tuple) else type(out))
    profiles = [UnitProfile(p[0], p[1], _param_bytes(unet, units[i].owned), *p[2:]) for i, p in enumerate(tracer.profiles)]
    return Trace(program, tracer.structures, profiles)


class _Tracer:
    def __init__(self, flops: bool):
        self.flops = flops
        self.mode = _Provenance()
        self.units: list[Unit] = []
        self.structures: dict[str, Structure] = {}
        self.profiles: list[tuple] = []

    def unit(self, name: str, forward, args, kwargs):
        sources = _sources((args, kwargs))
        if not sources:  # made from the conditioning alone (an embedding): shared, not a unit
            return forward(*args, **kwargs)
        if name in self.structures:
            raise UsageError(f"{name} runs twice in one UNet call, so the UNet cannot be split into stages there")
        index = len(self.units)
        counter = FlopCounterMode(display=False) if self.flops else contextlib.nullcontext()
        with self.mode.quiet(), counter:
            out = forward(*args, **kwargs)
        leaves = tree_leaves(out)
        for leaf, tensor in enumerate(leaves):
            if torch.is_tensor(tensor):
                setattr(tensor, _SOURCES, frozenset({(index, leaf)}))
        self.units.append(Unit(name, tuple(sorted(sources - {INPUT}))))
        self.structures[name] = Structure.of(out)
        sizes = tuple((tuple(t.shape), t.numel() * t.element_size()) for t in leaves if torch.is_tensor(t))
        self.profiles.append((name, counter.get_total_flops() if self.flops else 0, *sizes[0], sizes))
        return out

    def block(self, name: str, forward, args, kwargs):
        out = forward(*args, **kwargs)
        self.structures[name] = Structure.of(out)
        return out


class _Provenance(TorchFunctionMode):
    """Marks each operation's outputs (and, in place, its first argument) with the union of its inputs' sources."""

    def __init__(self):
        super().__init__()
        self.inside = 0  # inside a unit: its output is marked afresh, so nothing is tracked

    @contextlib.contextmanager
    def quiet(self):
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.inside:
            return out
        found = _sources((args, kwargs))
        if found:
            name = getattr(func, "__name__", "")
            targets = [t for t in tree_leaves(out) if torch.is_tensor(t)]
            if name == "__setitem__" or name.startswith("__i") or (name.endswith("_") and not name.endswith("__")):
                targets.append(args[0])  # in place: the tensor written to now depends on the inputs too
            for tensor in targets:
                setattr(tensor, _SOURCES, getattr(tensor, _SOURCES, frozenset()) | found)
        return out


def _sources(tree) -> frozenset[Key]:
    found: frozenset[Key] = frozenset()
    for leaf in tree_leaves(tree):
        if torch.is_tensor(leaf):
            found |= getattr(leaf, _SOURCES, frozenset())
    return found


def _meta(value):
    return torch.empty_like(value, device="meta") if torch.is_tensor(value) else value


def _span(units: tuple[Unit, ...], block: str) -> tuple[int, int]:
    inside = [i for i, u in enumerate(units) if u.name.startswith(block + ".")]
    return (inside[0], inside[-1] + 1) if inside else (0, 0)


def _param_bytes(unet, modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in unet.get_submodule(m).parameters())


def shared_modules(unet: torch.nn.Module, units: tuple[Unit, ...]) -> tuple[str, ...]:
    """The modules holding weights no unit uses (embeddings), whole where possible, and the first parameter's."""
    owners = [m for u in units for m in u.owned]
    shared = []
    for name, child in unet.named_children():
        inside = [m for m in owners if m == name or m.startswith(name + ".")]
        if not inside:
            shared += [name] if any(True for _ in child.parameters()) else []
            continue
        shared += sorted({p.rsplit(".", 1)[0] for p, _ in child.named_parameters(prefix=name)
                          if not any(p.startswith(m + ".") for m in inside)})
    first = next(unet.named_parameters())[0].rsplit(".", 1)[0]
    return tuple(dict.fromkeys([first, *shared]))


class _Hook(ModelHook):
    """Replaces a module's forward with `fn(forward, args, kwargs)`, `forward` being the module's own."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def new_forward(self, module, *args, **kwargs):
        return self.fn(self.fn_ref.original_forward, args, kwargs)


@contextlib.contextmanager
def registered(unet: torch.nn.Module, hooks: list[tuple[str, ModelHook]], name: str):
    """`hooks` (module name, hook) registered under `name` for the duration."""
    install(unet, hooks, name)
    try:
        yield
    finally:
        uninstall(unet, [module for module, _ in hooks], name)


def install(unet: torch.nn.Module, hooks: list[tuple[str, ModelHook]], name: str) -> None:
    for module, hook in hooks:
        HookRegistry.check_if_exists_or_initialize(unet.get_submodule(module)).register_hook(hook, name)


def uninstall(unet: torch.nn.Module, modules: list[str], name: str) -> None:
    for module in modules:
        HookRegistry.check_if_exists_or_initialize(unet.get_submodule(module)).remove_hook(name, recurse=False)


def unit_hook(fn) -> ModelHook:
    """A hook running `fn(forward, args, kwargs)` in place of a module's forward."""
    return _Hook(fn)
