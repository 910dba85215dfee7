"""A UNet forward pass as data: an ordered list of units (module names) over a hidden state and a skip stack.

Vocabulary used across asyncvid: a *unit* is one module of the UNet's forward order (a resnet, an attention, a
temporal layer, a sampler, `conv_in`, `conv_out`); a *stage* is a contiguous run of units placed on one rank; a
*step* is one denoising step; a *round* is one parallel iteration in which every stage runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

UnitFn = Callable[[Any, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


@dataclass(frozen=True)
class Unit:
    """One module of the forward order: `run(ctx, h, skip) -> h`; `pops` takes a skip, `pushes` leaves one."""

    name: str
    run: UnitFn = field(repr=False, compare=False)
    pops: bool = False
    pushes: bool = False
    modules: tuple[str, ...] = ()  # the modules whose weights it uses, when not just `name`

    @property
    def owned(self) -> tuple[str, ...]:
        return self.modules or (self.name,)


@dataclass(frozen=True)
class Program:
    """A UNet family's forward as units, plus the prologue every stage needs (time and condition embeddings).

    `prologue(*args, **kwargs) -> (ctx, x)` takes the UNet's forward arguments and returns the shared context and
    the input of the first unit; the last unit returns the UNet's output sample.
    """

    units: tuple[Unit, ...]
    shared: tuple[str, ...]  # modules every rank materialises (the embeddings)
    prologue: Callable[..., tuple[Any, torch.Tensor]] = field(repr=False, compare=False)
    output_type: type = field(repr=False, compare=False, default=tuple)  # the UNet's return_dict output class

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    @property
    def wiring(self) -> tuple[list[int | None], list[int | None]]:
        """`skip_wiring` of the units, derived once (it runs on every stage call)."""
        if "_wiring" not in self.__dict__:
            object.__setattr__(self, "_wiring", skip_wiring(self.units))
        return self.__dict__["_wiring"]


def skip_wiring(units) -> tuple[list[int | None], list[int | None]]:
    """For each unit, the id of the skip it pops and of the skip it pushes (a skip's id is its producer's index)."""
    stack: list[int] = []
    pops: list[int | None] = []
    pushes: list[int | None] = []
    for i, unit in enumerate(units):
        pops.append(stack.pop() if unit.pops else None)
        if unit.pushes:
            stack.append(i)
        pushes.append(i if unit.pushes else None)
    if stack:
        raise ValueError(f"unit program leaves {len(stack)} skip tensors unconsumed: it does not mirror a UNet")
    return pops, pushes


def run_units(program: Program, ctx, h: torch.Tensor, start: int, end: int, skips: dict[int, torch.Tensor]):
    """Run units [start, end) on `h`; `skips` holds the skip tensors by id and receives the ones pushed here."""
    pop_ids, push_ids = program.wiring
    for i in range(start, end):
        unit = program.units[i]
        skip = skips.pop(pop_ids[i]) if unit.pops else None
        h = unit.run(ctx, h, skip)
        if unit.pushes:
            skips[push_ids[i]] = h
    return h


def run_program(program: Program, *args, **kwargs) -> torch.Tensor:
    """The whole forward pass, unit by unit (equal to the UNet's own forward)."""
    ctx, x = program.prologue(*args, **kwargs)
    return run_units(program, ctx, x, 0, len(program.units), {})
