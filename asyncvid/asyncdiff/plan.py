"""The split of a unit program into stages, as data: which units each stage runs and which tensors cross."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from asyncvid.asyncdiff.units import Key, Program
from asyncvid.errors import UsageError


@dataclass(frozen=True)
class Transfer:
    """A unit output (`key`: unit, leaf) that stage `src` produces and stage `dst` consumes: the hidden state at a
    boundary, or a skip."""

    key: Key
    src: int
    dst: int


@dataclass(frozen=True)
class Plan:
    """Stage k runs units `bounds[k]:bounds[k+1]` of `names`; `costs` are the per-unit costs it was balanced on."""

    names: tuple[str, ...]
    bounds: tuple[int, ...]
    costs: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    def units(self, stage: int) -> range:
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of(self, unit: int) -> int:
        return next(k for k in range(self.num_stages) if unit < self.bounds[k + 1])

    def stage_costs(self) -> list[float]:
        return [sum(self.costs[i] for i in self.units(k)) for k in range(self.num_stages)]

    def as_lists(self) -> list[list[str]]:
        return [[self.names[i] for i in self.units(k)] for k in range(self.num_stages)]


def balance(costs: list[float], n: int, weights: list[float] | None = None, cap: float | None = None):
    """Bounds of the contiguous split into `n` stages that minimises the slowest stage, each stage holding at most
    `cap` of the total `weights` (a memory limit); None when no split meets the cap."""
    m = len(costs)
    cost_sum, weight_sum = _prefix(costs), _prefix(weights or [0.0] * m)
    limit = (cap if cap is not None else float("inf")) * weight_sum[-1]
    inf = float("inf")
    best = [[inf] * (m + 1) for _ in range(n + 1)]  # best[k][j]: slowest stage when units [0, j) form k stages
    cut = [[0] * (m + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for j in range(k, m - (n - k) + 1):
            for i in range(k - 1, j):
                if weight_sum[j] - weight_sum[i] > limit:
                    continue
                worst = max(best[k - 1][i], cost_sum[j] - cost_sum[i])
                if worst < best[k][j]:
                    best[k][j], cut[k][j] = worst, i
    if best[n][m] == inf:
        return None
    bounds = [m]
    for k in range(n, 0, -1):
        bounds.append(cut[k][bounds[-1]])
    return tuple(reversed(bounds))


def _prefix(values: list[float]) -> list[float]:
    out = [0.0]
    for v in values:
        out.append(out[-1] + v)
    return out


def capped_balance(costs: list[float], n: int, weights: list[float], cap: float = 0.6) -> tuple[int, ...]:
    """Balance by cost while no stage holds more than `cap` of the weights, relaxing the cap until a split exists:
    without it the cheap, weight-heavy deep blocks all land on one rank."""
    while (bounds := balance(costs, n, weights, cap)) is None:
        cap += 0.05
    return bounds


def make_plan(names: list[str], costs: list[float], stages: int, split: list[str] | None = None,
              weights: list[float] | None = None, weight_cap: float = 1.0) -> Plan:
    """Balance `stages` stages by cost (under a weight cap when `weights` are given), or follow a manual `split`
    (the first unit of each stage after the first)."""
    if not 1 <= stages <= len(names):
        raise UsageError(f"stages must be between 1 and {len(names)} (the units of this UNet), got {stages}")
    if not split:
        bounds = (capped_balance(list(costs), stages, list(weights), weight_cap) if weights and weight_cap < 1
                  else balance(list(costs), stages))
        return Plan(tuple(names), bounds, tuple(costs))
    if len(split) != stages - 1:
        raise UsageError(f"a manual split for {stages} stages names {stages - 1} units, got {len(split)}: {split}")
    index = {name: i for i, name in enumerate(names)}
    for name in split:
        if name not in index:
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else "; `asyncvid plan` lists the units"
            raise UsageError(f"unknown unit '{name}' in the manual split{hint}")
    bounds = (0, *[index[name] for name in split], len(names))
    if any(a >= b for a, b in zip(bounds, bounds[1:])) or bounds[1] == 0:
        raise UsageError(f"the manual split {split} must name units in forward order, after the first unit")
    return Plan(tuple(names), bounds, tuple(costs))


def transfers(plan: Plan, program: Program) -> list[Transfer]:
    """Every unit output a later stage consumes, once per consuming stage, in one order all ranks share."""
    moves = []
    for k in range(plan.num_stages):
        for key in sorted(program.needs_of(plan.units(k), last=k == plan.num_stages - 1)):
            if plan.stage_of(key[0]) > k:
                raise ValueError(f"{plan.names[key[0]]} feeds an earlier unit: the UNet's forward is not a chain")
            moves.append(Transfer(key, plan.stage_of(key[0]), k))
    return moves


def transfer_bytes(plan: Plan, profiles, move: Transfer) -> tuple[tuple[int, ...], int]:
    """Shape and bytes of a transfer, from the profile of the unit that produced it."""
    unit, leaf = move.key
    profile = profiles[unit]
    return profile.leaves[leaf] if profile.leaves else (profile.out_shape, profile.out_bytes)


def describe(plan: Plan, profiles, moves: list[Transfer]) -> str:
    """A printable table: each stage's units, share of cost, weight bytes, and the tensors it receives."""
    total = sum(plan.costs) or 1.0
    lines = []
    for k in range(plan.num_stages):
        units = list(plan.units(k))
        weights = sum(profiles[i].param_bytes for i in units)
        share = sum(plan.costs[i] for i in units) / total
        lines.append(f"stage {k}: {len(units)} units, {share:6.1%} of cost, {weights / 2**20:8.2f} MiB weights")
        lines += [f"    {plan.names[i]}" for i in units]
        for move in moves:
            if move.dst == k:
                shape, size = transfer_bytes(plan, profiles, move)
                what = ("hidden state" if move.key[0] == plan.bounds[move.dst] - 1
                        else f"skip of {plan.names[move.key[0]]}")
                lines.append(f"  <- stage {move.src}: {what} {list(shape)} ({size / 2**20:.3f} MiB)")
    sent = sum(transfer_bytes(plan, profiles, m)[1] for m in moves)
    lines.append(f"crossing stages per step: {len(moves)} tensors, {sent / 2**20:.3f} MiB")
    return "\n".join(lines)
