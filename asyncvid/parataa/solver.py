"""ParaTAA (Tang et al., ICML 2024): solve the whole sampling trajectory as a triangular nonlinear system.

Vocabulary: step i maps x_i to x_{i+1} (asyncvid.parataa.trajectory); a round evaluates the model on every step of the window
[lo, hi) at once and updates x_{lo+1} … x_{hi}; steps below lo are final. The order-k equation of step i unrolls the
sampler from x_j, j = max(i + 1 - k, lo), with this round's model outputs; its residual R_i is how far x_{i+1} is from
it. Triangular Anderson acceleration (TAA) combines the last m iterates of step i using the residual differences of
step i and every noisier step of the window (Algorithm 1 of the paper).

Beyond the paper: the first trajectory can come from one model call at x_0 instead of copies of the noise
(`start="jump"`), and the solve can stop once a round no longer moves the sample x_n (`sample_tol`): the per-step
rule alone either freezes steps early at a loose tolerance (and the sample drifts from sequential sampling's) or waits
for the last, least important steps at a strict one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.parataa.trajectory import Direction, Trajectory, step


@dataclass(frozen=True)
class Round:
    """What one round did: its window, its largest relative residual, and how many steps are final after it."""

    lo: int
    hi: int
    residual: float  # max over the window of rms(one-step residual) / the step's noise scale
    final: int
    change: float = float("inf")  # rms of this round's change of the sample x_n (inf: x_n had no estimate yet)


@dataclass
class Solution:
    """The sample x_n, the whole trajectory (n + 1 iterates), and the cost of finding it."""

    x: torch.Tensor
    trajectory: torch.Tensor
    rounds: list[Round] = field(default_factory=list)
    evaluations: int = 0  # model evaluations, one per step of a window (times the guidance branches, if counted)
    converged: bool = False


def solve(x0: torch.Tensor, traj: Trajectory, direction: Direction, config: ParaTAAConfig, *,
          noise: torch.Tensor | None = None, init: torch.Tensor | None = None,
          on_round: Callable[[Round], None] | None = None, agree: Callable[[int], int] | None = None) -> Solution:
    """Fixed-point iteration with triangular Anderson acceleration over the trajectory of `traj` from x0.

    `direction(x rows, step indices)` is one batched model call; `noise` (n, ...) is drawn up front for stochastic
    samplers; `init` (n + 1, ...) starts from a stored trajectory (only its last `variation_steps` are solved);
    `agree(lo)` returns the value every rank uses (rank 0's), so that all ranks stop together.
    """
    n = traj.steps
    window, rounds_left = config.window_for(n), config.rounds_for(n)
    order = config.order or window
    xs = torch.empty((n + 1, *x0.shape), dtype=torch.float64, device=x0.device)
    xs[0] = x0
    lo, filled = 0, 0  # steps < lo are final; x_0 … x_filled hold an iterate
    if init is not None:
        xs[1:] = init[1:].to(xs)
        lo, filled = n - (config.variation_steps or n), n
        xs[: lo + 1] = init[: lo + 1].to(xs)
    z = None if noise is None or not traj.stochastic else noise.to(xs)
    history: dict[int, deque] = {}  # step -> the last m (x_{i+1}, R_i) before each update
    solution = Solution(xs[n], xs)

    def record(r: Round) -> None:
        solution.rounds.append(r)
        if on_round is not None:
            on_round(r)

    if init is None and config.start == "jump" and rounds_left > 0:
        d0 = direction(xs[:1], torch.arange(1)).to(xs)[0]
        solution.evaluations += 1
        _jump(traj, xs, d0, z)
        lo, filled, rounds_left = 1, n, rounds_left - 1  # x_1 came from the exact model output at x_0
        record(Round(0, 1, 0.0, lo))
    while lo < n and rounds_left > 0:
        hi = min(lo + window, n)
        had_sample = filled == n  # x_n holds an estimate (not a copy made below), so its change means something
        if filled < hi:  # steps entering the window start from the last iterate (the paper's initialisation)
            xs[filled + 1: hi + 1] = xs[filled]
            filled = hi
        steps = torch.arange(lo, hi)
        d = direction(xs[lo:hi], steps).to(xs)
        solution.evaluations += hi - lo
        one_step = _rms(_unrolled(traj, lo, hi, 1, xs, d, z) - xs[lo + 1: hi + 1])
        residual = one_step / traj.noise_scale[lo:hi].to(xs)
        # The paper's rule: a step converged when its residual is within the absolute or the relative tolerance.
        late = torch.nonzero(~((residual <= config.tol) | (one_step <= config.atol))).flatten()  # NaN: not final
        # The first step that has not converged is exact after this update (its input x_lo … is final).
        first_open = lo + int(late[0]) if len(late) else hi - 1
        r = _unrolled(traj, lo, hi, order, xs, d, z) - xs[lo + 1: hi + 1]
        for i in range(lo, hi):
            history.setdefault(i, deque(maxlen=config.history)).append((xs[i + 1].clone(), r[i - lo]))
        correction = _anderson(history, lo, hi, first_open + 1, config.regularization)
        sample_before = xs[n].clone() if hi == n and had_sample else None
        xs[lo + 1: hi + 1] += r - correction
        change = float(_rms((xs[n] - sample_before)[None])) if sample_before is not None else float("inf")
        lo = first_open + 1
        if config.sample_tol is not None and change <= config.sample_tol:
            lo = n  # the sample has stopped moving: what is left would not change the video
        if agree is not None:
            lo = agree(lo)
        for i in [s for s in history if s < lo]:
            del history[i]
        rounds_left -= 1
        record(Round(int(steps[0]), hi, float(residual.max()), lo, change))
    solution.x, solution.converged = xs[n], lo >= n
    return solution


def _jump(traj: Trajectory, xs: torch.Tensor, d0: torch.Tensor, z: torch.Tensor | None) -> None:
    """The first trajectory: every step sampled as if the model kept predicting x_0's clean sample (a one-step
    coarse pass, interpolated by the sampler's own steps); the paper copies the noise instead."""
    clean = traj.clean_x[0] * xs[0] + traj.clean_d[0] * d0
    xs[1] = step(traj, 0, xs[0], d0, None if z is None else z[0])
    for i in range(1, traj.steps):  # D_i = (x̂ - clean_x_i x_i) / clean_d_i, with x̂ held fixed
        d = (clean - traj.clean_x[i] * xs[i]) / traj.clean_d[i]
        xs[i + 1] = step(traj, i, xs[i], d, None if z is None else z[i])


def _rms(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).pow(2).mean(1).sqrt()


def _unrolled(traj: Trajectory, lo: int, hi: int, order: int, xs, d, z) -> torch.Tensor:
    """x_{i+1} predicted for each step i of [lo, hi) by unrolling `order` sampler steps (capped at lo)."""
    width = hi - lo
    from_x = torch.zeros(width, width, dtype=torch.float64)
    from_d = torch.zeros(width, width, dtype=torch.float64)
    from_z = torch.zeros(width, width, dtype=torch.float64)
    for row in range(width):
        i = lo + row
        gain = 1.0  # product of a_q over the steps after p, up to i
        for p in range(i, max(i + 1 - order, lo) - 1, -1):
            from_d[row, p - lo] = traj.b[p] * gain
            from_z[row, p - lo] = traj.e[p] * gain
            gain *= float(traj.a[p])
        from_x[row, max(i + 1 - order, lo) - lo] = gain
    out = _mix(from_x, xs[lo:hi]) + _mix(from_d, d)
    return out if z is None else out + _mix(from_z, z[lo:hi])


def _mix(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return (weights.to(rows) @ rows.flatten(1)).view_as(rows)


def _anderson(history: dict[int, deque], lo: int, hi: int, start: int, regularization: float) -> torch.Tensor:
    """TAA corrections for steps [start, hi): step i's coefficients fit the residual differences of steps lo … i."""
    shape = history[lo][-1][0].shape
    correction = torch.zeros((hi - lo, *shape), dtype=torch.float64, device=history[lo][-1][0].device)
    lengths = {i: len(history[i]) - 1 for i in range(start, hi)}  # differences of iterates each step has
    for size in sorted({m for m in lengths.values() if m > 0}):
        steps = [i for i in range(start, hi) if lengths[i] == size]
        gram = torch.zeros(size, size, dtype=torch.float64)
        rhs = torch.zeros(size, dtype=torch.float64)
        for p in range(lo, max(steps) + 1):  # running sums over the noisier steps: the triangular structure
            dx, dr = _differences(history[p], size)
            gram += (dr @ dr.T).cpu()
            rhs += (dr @ history[p][-1][1].flatten()).cpu()
            if p in steps:
                ridge = regularization * float(gram.diagonal().mean()) + 1e-30
                gamma = torch.linalg.solve(gram + ridge * torch.eye(size, dtype=torch.float64), rhs)
                correction[p - lo] = ((dx + dr).T @ gamma.to(dx)).view(shape)
    return correction


def _differences(entries: deque, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `size` differences of consecutive iterates and of their residuals, flattened (size, numel)."""
    recent = list(entries)[-(size + 1):]
    xs = torch.stack([x.flatten() for x, _ in recent])
    rs = torch.stack([r.flatten() for _, r in recent])
    return xs[1:] - xs[:-1], rs[1:] - rs[:-1]
