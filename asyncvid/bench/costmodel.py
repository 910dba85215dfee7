"""A cost model of parallel sampling: unit compute times plus a link's latency and bandwidth predict the latency of
a step (AsyncDiff round / S, CFG-parallel step, ParaTAA round) on N devices.

Vocabulary as in asyncvid.asyncdiff.hook: a round is one parallel iteration; with stride S it covers S steps. A link
moves b bytes in latency + b / bandwidth seconds. The UNet's compute time is the sum of its units' times; a stage's,
the sum over its units.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.plan import make_plan, transfer_bytes, transfers


@dataclass(frozen=True)
class Link:
    """Point-to-point transfers between two ranks: seconds = latency_s + bytes / bandwidth (bytes per second)."""

    latency_s: float
    bandwidth: float

    def __post_init__(self):
        if self.latency_s < 0 or self.bandwidth <= 0:
            raise ValueError(f"a link needs latency >= 0 and bandwidth > 0, got {self.latency_s} s and "
                             f"{self.bandwidth} B/s")

    def time(self, nbytes: float) -> float:
        return 0.0 if nbytes <= 0 else self.latency_s + nbytes / self.bandwidth

    def broadcast(self, nbytes: float, ranks: int) -> float:
        """A broadcast to `ranks` ranks as a binary tree: ceil(log2(ranks)) transfers one after another."""
        return math.ceil(math.log2(ranks)) * self.time(nbytes) if ranks > 1 else 0.0


def fit_link(sizes: list[int], seconds: list[float]) -> Link:
    """Least-squares line through (bytes, one-way seconds): intercept = latency, 1 / slope = bandwidth."""
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    slope = max(slope, 1e-15)
    return Link(max(my - slope * mx, 0.0), 1.0 / slope)


def ping_pong(rank, sizes=(4, 2**16, 2**20, 2**22), repeats: int = 20) -> tuple[list[int], list[float]] | None:
    """One-way seconds (half the median round trip) of each message size between ranks 0 and 1 (through
    `launch.run` with 2 ranks); rank 0 returns (sizes, seconds), rank 1 None."""
    out = []
    for size in sizes:
        buf = torch.zeros(max(size // 4, 1), dtype=torch.float32, device=rank.device)
        trips = []
        for i in range(repeats + 2):
            dist.barrier()
            start = time.perf_counter()
            if rank.rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank.rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
            if i >= 2:  # the first trips set up the connection
                trips.append(time.perf_counter() - start)
        out.append(statistics.median(trips) / 2)
    return (list(sizes), out) if rank.rank == 0 else None


@dataclass(frozen=True)
class Stages:
    """A UNet split into stages: each stage's compute seconds and weight bytes, and the bytes that cross from
    stage src to stage dst per step (keyed (src, dst))."""

    compute_s: tuple[float, ...]
    weight_bytes: tuple[int, ...]
    crossing: dict
    eps_bytes: int  # the noise prediction that the last stage broadcasts

    @property
    def count(self) -> int:
        return len(self.compute_s)


def split(profiles, unit_s: list[float], program, stages: int, eps_bytes: int,
          balance_on: list[float] | None = None) -> Stages:
    """The stage split a run would make (balanced on `balance_on`, default these unit times) and what it costs."""
    plan = make_plan([p.name for p in profiles], list(balance_on or unit_s), stages)
    crossing: dict = {}
    for move in transfers(plan, program):
        crossing[(move.src, move.dst)] = (crossing.get((move.src, move.dst), 0)
                                          + transfer_bytes(plan, profiles, move)[1])
    compute = tuple(sum(unit_s[i] for i in plan.units(k)) for k in range(stages))
    weights = tuple(sum(profiles[i].param_bytes for i in plan.units(k)) for k in range(stages))
    return Stages(compute, weights, crossing, eps_bytes)


def asyncdiff_round(stages: Stages, link: Link, stride: int = 1) -> float:
    """Seconds of one parallel round (S steps): every stage computes at once, then each rank sends its boundary
    tensors (to every replica of the last stage), then the S replicas broadcast their noise predictions."""
    world = stages.count + stride - 1
    fanout = [stride if dst == stages.count - 1 else 1 for dst in range(stages.count)]
    sent = [0.0] * stages.count
    for (src, dst), nbytes in stages.crossing.items():
        sent[src] += nbytes * fanout[dst]
    return max(stages.compute_s) + max(link.time(b) for b in sent) + stride * link.broadcast(stages.eps_bytes, world)


def asyncdiff_relay(stages: Stages, link: Link, stride: int = 1) -> float:
    """Seconds of one warm-up step: the stages one after another, each waiting for what it receives."""
    world = stages.count + stride - 1
    into = [sum(b for (_, dst), b in stages.crossing.items() if dst == k) for k in range(stages.count)]
    return sum(stages.compute_s) + sum(link.time(b) for b in into) + link.broadcast(stages.eps_bytes, world)


def asyncdiff_loop(stages: Stages, link: Link, *, steps: int, warmup: int, stride: int, other_s: float,
                   relay_s: float | None = None) -> float:
    """Seconds of the denoising loop: `other_s` (encoding, scheduler steps: outside the UNet, the same on every
    rank as in sequential sampling), warm-up relays (`relay_s` each, default asyncdiff_relay), then rounds of S
    steps."""
    warmup = min(warmup, steps)
    rounds = math.ceil((steps - warmup) / stride)
    relay = asyncdiff_relay(stages, link, stride) if relay_s is None else relay_s
    return other_s + warmup * relay + rounds * asyncdiff_round(stages, link, stride)


def cfg_parallel_step(half_s: float, eps_bytes: int, link: Link) -> float:
    """Seconds of a step with the guidance batch split over two ranks: half the batch each, then the two halves of
    the noise prediction swapped."""
    return half_s + link.time(eps_bytes / 2)


def parataa_loop(windows: list[int], branches: int, row_s: float, row_bytes: int, link: Link, devices: int,
                 other_s: float) -> float:
    """Seconds of ParaTAA's solve on `devices` ranks: each round, the slowest rank's share of the window's rows
    (steps x guidance branches, one batched UNet call), then every rank's share gathered by every rank."""
    total = other_s
    for window in windows:
        share = -(-window * branches // devices)
        gather = (devices - 1) * link.time(share * row_bytes) if devices > 1 else 0.0  # ring all-gather
        total += share * row_s + gather
    return total


def error(predicted: float, measured: float) -> float:
    """Signed relative error of a prediction."""
    return (predicted - measured) / measured
