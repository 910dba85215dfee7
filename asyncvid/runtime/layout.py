"""The rank layout: world = data-parallel degree x the sampler's group size; each group makes whole videos.

Group g holds the consecutive ranks [g * G, (g + 1) * G), so under torchrun with one group per machine a group's
stage-to-stage traffic stays on its machine. Videos are dealt to groups; a video is made by one group alone, with
the same sampler settings whatever the degree, so its bytes do not depend on the layout (same threads per process).
"""

from __future__ import annotations

from dataclasses import dataclass

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.errors import UsageError


@dataclass(frozen=True)
class RankLayout:
    """`data_parallel` groups of `group_size` ranks; `factors` name what multiplies into a group (for errors)."""

    data_parallel: int = 1
    group_size: int = 1
    factors: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        for name, value in (("data-parallel", self.data_parallel), ("group size", self.group_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"{name} must be an integer of at least 1, got {value!r}; use --data-parallel 1 "
                                 f"or more")

    @classmethod
    def of(cls, sampler, data_parallel: int = 1, devices: int | None = None) -> RankLayout:
        """`data_parallel` groups of `sampler` (None: sequential) on `devices` processes in all (None: as many as
        the groups need). A sequential group is one rank; an AsyncDiff group stages + stride - 1 ranks, doubled by
        CFG-parallel; a ParaTAA group devices / data_parallel ranks (1 when `devices` is None)."""
        if sampler is None:
            return cls(data_parallel, 1, (("sequential", 1),))
        if isinstance(sampler, AsyncDiffConfig):
            factors = [(f"(stages {sampler.stages} + stride {sampler.stride} - 1)", sampler.group_size)]
            if sampler.cfg_parallel:
                factors.append(("cfg-parallel", 2))
            return cls(data_parallel, sampler.world_size, tuple(factors))
        size = 1 if devices is None else max(1, devices // max(data_parallel, 1))
        return cls(data_parallel, size, (("parataa devices per group", size),))

    @property
    def world_size(self) -> int:
        return self.data_parallel * self.group_size

    def formula(self) -> str:
        """E.g. "data-parallel 2 x (stages 2 + stride 1 - 1) 2 x cfg-parallel 2 = 8"."""
        parts = [f"data-parallel {self.data_parallel}", *(f"{name} {value}" for name, value in self.factors)]
        return " x ".join(parts) + f" = {self.world_size}"

    def check_world_size(self, world_size: int, *, launched: bool = False) -> None:
        """Every rank calls this before any collective, so a mismatch fails everywhere instead of hanging."""
        if world_size != self.world_size:
            if launched:
                raise UsageError(f"the layout needs {self.formula()} processes, but the launcher started "
                                 f"{world_size}; launch {self.world_size} (nodes x processes per node)")
            raise UsageError(f"the layout needs {self.formula()} processes, but {world_size} were asked for (--devices); "
                             f"use --devices {self.world_size}, or leave --devices out")

    def group_of(self, rank: int) -> int:
        return rank // self.group_size

    def ranks_of(self, group: int) -> list[int]:
        return list(range(group * self.group_size, (group + 1) * self.group_size))

    def leaders(self) -> list[int]:
        """The first rank of each group: it gathers its group's frames and writes its videos."""
        return [g * self.group_size for g in range(self.data_parallel)]

    def deal(self, count: int) -> list[int]:
        """The group of each of `count` videos, dealt in turn (group of video i = i mod D)."""
        return [i % self.data_parallel for i in range(count)]

    def describe(self, group: int | None = None) -> dict:
        """What a sidecar records (not compared on resume: the layout does not change the bytes)."""
        made = {"data_parallel": self.data_parallel, "group_size": self.group_size}
        return made if group is None else {**made, "group": group}
