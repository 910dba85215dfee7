"""A UNet's forward pass as data: its units in call order, what each one's input is computed from, what every rank
keeps. Derived by tracing the UNet's own forward (asyncvid.asyncdiff.trace), never written per family.

Vocabulary used across asyncvid: a *unit* is one module of the UNet's forward order (a resnet, an attention, a
temporal layer, a sampler, `conv_in`, `conv_out`); a *stage* is a contiguous run of units placed on one rank; a
*step* is one denoising step; a *round* is one parallel iteration in which every stage runs once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Key = tuple[int, int]  # one tensor of a unit's output: (unit index, leaf index in the output's pytree)


@dataclass(frozen=True)
class Unit:
    """One module of the forward order; `needs` are the outputs of earlier units its input is computed from, through
    whatever the UNet does between units (skip concatenation, FreeU, ControlNet residuals)."""

    name: str
    needs: tuple[Key, ...] = ()
    modules: tuple[str, ...] = ()  # the modules whose weights it uses, when not just `name`

    @property
    def owned(self) -> tuple[str, ...]:
        return self.modules or (self.name,)


@dataclass(frozen=True)
class Block:
    """A block of the UNet (`down_blocks.1`, `mid_block`) holding units [start, stop): skipped whole on a rank that
    neither computes nor receives any of them, so its own code never runs on placeholders there."""

    name: str
    start: int
    stop: int


@dataclass(frozen=True)
class Program:
    """The units of a UNet in forward order, the modules every rank keeps (embeddings, and the first parameter's,
    which diffusers reads for the model's device and dtype), its blocks, and what its output is computed from."""

    units: tuple[Unit, ...]
    shared: tuple[str, ...]
    blocks: tuple[Block, ...] = ()
    output_needs: tuple[Key, ...] = ()
    output_type: type | None = field(default=None, compare=False)  # the UNet's return_dict output class

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def needs_of(self, units: range, *, last: bool) -> set[Key]:
        """The outputs of units outside `units` that computing them takes (and the UNet's output, on the last stage)."""
        needed = {key for i in units for key in self.units[i].needs}
        if last:
            needed |= set(self.output_needs)
        return {key for key in needed if key[0] not in units}

    def wiring(self) -> tuple:
        """What must agree between a plan and a call: the units and where each one's input comes from."""
        return tuple((u.name, u.needs) for u in self.units), self.output_needs
