"""AsyncDiff settings (Chen et al., NeurIPS 2024) and the rank layout they imply, validated on construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from asyncvid.asyncdiff.stale import STALE
from asyncvid.errors import UsageError

COSTS = ("measured", "flops")


@dataclass(frozen=True)
class AsyncDiffConfig:
    """`stages` UNet stages on as many ranks, `stride` steps per parallel round (stride - 1 extra ranks replicate
    the last stage), `warmup` exact sequential steps first, `time_shift` feeds stages the previous timestep, `stale`
    how stages use their one-round-old inputs."""

    stages: int = 2
    stride: int = 1
    warmup: int = 3
    time_shift: bool = False
    split: tuple[str, ...] | None = None  # manual split: the first unit of each stage after the first
    cost: str = "measured"  # how units are weighed for balancing: measured time, or FLOPs
    # The most of the UNet's weights one stage may hold (relaxed if no split fits). 1 balances compute alone, which
    # is fastest; a UNet's deep blocks hold most weights but little compute, so a cap trades speed for memory.
    weight_cap: float = 1.0
    cfg_parallel: bool = False  # the two halves of the guidance batch on two groups of ranks
    # How stages use their one-round-old inputs (asyncvid.asyncdiff.stale): "reuse" is the paper's method;
    # "extrapolate" (the default) predicts them from the last two rounds (docs/ASYNCDIFF.md has where it helps).
    stale: str = "extrapolate"
    # A synchronous step (a relay, like warm-up) every `refresh` steps after warm-up, which brings every stage's inputs
    # back to the present; 0: never. Each costs about stages - 1 stage forwards more than a round (stride 1 only).
    refresh: int = 0

    def __post_init__(self):
        if not isinstance(self.stages, int) or self.stages < 1:
            raise UsageError(f"stages must be a whole number >= 1, got {self.stages!r}")
        if not isinstance(self.stride, int) or self.stride < 1:
            raise UsageError(f"stride must be a whole number >= 1, got {self.stride!r}")
        if not isinstance(self.warmup, int) or self.warmup < 1:
            raise UsageError(
                f"warmup must be >= 1 (the first step fills every stage's inputs), got {self.warmup!r}"
            )
        if self.cost not in COSTS:
            raise UsageError(f"cost must be one of {', '.join(COSTS)}, got {self.cost!r}")
        if not 0 < self.weight_cap <= 1:  # also refuses nan
            raise UsageError(f"weight cap is a share of the UNet's weights in (0, 1], got {self.weight_cap!r}")
        if not isinstance(self.refresh, int) or isinstance(self.refresh, bool) or self.refresh < 0:
            raise UsageError(f"refresh must be a whole number >= 0 (0: never), got {self.refresh!r}; use e.g. "
                             f"--refresh 10")
        if self.refresh and self.stride > 1:
            raise UsageError(f"refresh works with stride 1 only, got stride {self.stride}; drop --refresh "
                             f"{self.refresh} or use --stride 1")
        if self.stale not in STALE:
            raise UsageError(f"stale must be one of {', '.join(STALE)}, got {self.stale!r}")
        if self.split is not None:
            object.__setattr__(self, "split", tuple(self.split))

    def synchronous(self, step: int) -> bool:
        """Whether step `step` is a relay (the stages one after another, exact): warm-up, and every refresh."""
        return step < self.warmup or (self.refresh > 0 and (step - self.warmup) % self.refresh == self.refresh - 1)

    @property
    def group_size(self) -> int:
        """Ranks that run one copy of the staged UNet."""
        return self.stages + self.stride - 1

    @property
    def world_size(self) -> int:
        return self.group_size * (2 if self.cfg_parallel else 1)

    def check_world_size(self, world_size: int, *, launched: bool = False) -> None:
        """Every rank calls this before any collective, so a mismatch fails everywhere instead of hanging;
        `launched`: the processes came from an outside launcher (torchrun), not from --devices."""
        if world_size != self.world_size:
            formula = f"stages + stride - 1 = {self.stages} + {self.stride} - 1 = {self.group_size}"
            if self.cfg_parallel:
                formula = f"(stages + stride - 1) x 2 = ({self.stages} + {self.stride} - 1) x 2 = {self.world_size}"
            fix = (f"launch {self.world_size} processes (torchrun --nproc-per-node {self.world_size})" if launched
                   else f"use --devices {self.world_size}")
            raise UsageError(
                f"AsyncDiff needs {formula} processes, but {world_size} were started; {fix} or change --stages or "
                f"--stride"
            )

    def check_steps(self, steps: int) -> None:
        """Limits that depend on the request's number of steps."""
        if self.warmup > steps:
            raise UsageError(f"warm-up {self.warmup} is more than the {steps} steps; use --warmup {steps} or fewer "
                             f"(--warmup equal to --steps reproduces sequential sampling)")

    def describe(self) -> dict:
        return {"name": "asyncdiff", **asdict(self)}


@dataclass(frozen=True)
class Layout:
    """Which stage each rank runs: stages 0..N-2 on ranks 0..N-2, the last stage on ranks N-1..N+S-2 (replicas)."""

    stages: int
    stride: int

    def stage_of(self, rank: int) -> int:
        return min(rank, self.stages - 1)

    def ranks_of(self, stage: int) -> list[int]:
        if stage < self.stages - 1:
            return [stage]
        return list(range(self.stages - 1, self.stages - 1 + self.stride))

    def replica(self, rank: int) -> int:
        """Which step of a round a last-stage rank computes (0 for ranks of the other stages)."""
        return rank - (self.stages - 1) if rank >= self.stages - 1 else 0
