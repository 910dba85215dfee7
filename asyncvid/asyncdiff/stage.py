"""One stage of a UNet, run through the UNet's own forward: removable hooks on its units decide, unit by unit, to
compute (this stage), to return a tensor another stage produced, or to return a placeholder of the right shape
(nobody here needs it). diffusers' own code between units (skip concatenation, FreeU, ControlNet residuals,
IP-Adapter attention, upsample sizes) runs as it does in the whole UNet, so nothing of the forward is re-implemented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.utils._pytree import tree_flatten, tree_leaves

from asyncvid.asyncdiff.trace import Structure, install, trace, uninstall, unit_hook
from asyncvid.asyncdiff.units import Key, Program
from asyncvid.errors import UsageError

STAGE_HOOK = "asyncvid.asyncdiff.stage"


class _StageDone(Exception):
    """Raised after a stage's last unit when later units belong to other stages: nothing after it is needed here."""


@dataclass
class _Role:
    """What this call of the forward does: compute `units`, stand `received` in for others' outputs, keep `wanted`."""

    units: range
    received: dict[Key, torch.Tensor]
    wanted: set[Key]
    structures: dict[str, Structure]
    device: torch.device
    run_blocks: set[str]
    produced: dict[Key, torch.Tensor] = field(default_factory=dict)


class StageRunner:
    """Hooks on `unet`'s units and blocks (idle outside `run`); `remove()` takes them off."""

    def __init__(self, unet: torch.nn.Module, program: Program):
        self.unet, self.program = unet, program
        self.role: _Role | None = None
        self.traced: dict[tuple, dict[str, Structure]] = {}  # per call signature: the outputs' structures
        self.zeros: dict[tuple, torch.Tensor] = {}
        hooks = [(u.name, unit_hook(lambda fwd, a, k, i=i: self._unit(i, fwd, a, k)))
                 for i, u in enumerate(program.units)]
        hooks += [(b.name, unit_hook(lambda fwd, a, k, b=b: self._block(b.name, fwd, a, k))) for b in program.blocks]
        install(unet, hooks, STAGE_HOOK)

    def remove(self) -> None:
        uninstall(self.unet, [u.name for u in self.program.units] + [b.name for b in self.program.blocks], STAGE_HOOK)

    def run(self, forward: Callable, units: range, received: dict[Key, torch.Tensor], wanted: set[Key], args,
            kwargs):
        """`forward(*args, **kwargs)` computing only `units`; returns its output (None for a stage before the last,
        whose forward stops after its last unit) and the `wanted` unit outputs."""
        structures = self._structures(forward, args, kwargs)
        device = next(t.device for t in tree_leaves((args, kwargs)) if torch.is_tensor(t))
        touched = set(units) | {key[0] for key in received}
        run_blocks = {b.name for b in self.program.blocks if touched & set(range(b.start, b.stop))}
        self.role = _Role(units, received, wanted, structures, device, run_blocks)
        try:
            out = forward(*args, **kwargs)
        except _StageDone:
            out = None
        finally:
            role, self.role = self.role, None
        return out, role.produced

    def _unit(self, index: int, forward, args, kwargs):
        role = self.role
        if role is None:
            return forward(*args, **kwargs)
        if index in role.units:
            out = forward(*args, **kwargs)
            leaves = tree_leaves(out)
            for unit, leaf in role.wanted:
                if unit == index:  # a copy: diffusers' glue may change the output in place (FreeU) before it is sent
                    role.produced[(unit, leaf)] = leaves[leaf].clone()
            if index == role.units.stop - 1 < len(self.program.units) - 1:
                raise _StageDone
            return out
        structure = role.structures[self.program.units[index].name]
        return structure.build(lambda leaf, shape, dtype: (role.received[(index, leaf)].clone()
                                                           if (index, leaf) in role.received
                                                           else self._zeros(shape, dtype, role.device)))

    def _block(self, name: str, forward, args, kwargs):
        role = self.role
        if role is None or name in role.run_blocks:
            return forward(*args, **kwargs)
        return role.structures[name].build(lambda leaf, shape, dtype: self._zeros(shape, dtype, role.device))

    def _zeros(self, shape, dtype, device) -> torch.Tensor:
        key = (shape, dtype, device)
        if key not in self.zeros:
            self.zeros[key] = torch.zeros(shape, dtype=dtype, device=device)
        return self.zeros[key]

    def _structures(self, forward, args, kwargs) -> dict[str, Structure]:
        """The output structures of a call with these inputs, traced once per signature; the call must wire the
        UNet as the plan does."""
        signature = _signature(args, kwargs)
        if signature not in self.traced:
            traced = trace(self.unet, args, kwargs, forward=forward)
            if traced.program.wiring() != self.program.wiring():
                raise UsageError(
                    "this UNet call connects its units differently than the split was planned for; plan with the "
                    "same model and add-ons (`asyncvid plan`) or sample sequentially"
                )
            self.traced = {signature: traced.structures}  # one signature at a time: a run keeps its shapes
            self.zeros = {}
        return self.traced[signature]


def _signature(args, kwargs) -> tuple:
    leaves, spec = tree_flatten((args, kwargs))
    return str(spec), tuple((tuple(x.shape), x.dtype, x.device) if torch.is_tensor(x) else
                            type(x).__name__ if isinstance(x, (int, float)) else repr(x) for x in leaves)
