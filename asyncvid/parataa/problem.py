"""ParaTAA's view of one request: the initial latents, the trajectory, and the model as rows of one batched call.

A round's batch has one row per (guidance branch, window step); rows are split evenly across ranks, each rank runs
the UNet on its share, and an all-gather gives every rank every row, so every rank takes the same solver update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from asyncvid.parataa.trajectory import Direction, Trajectory

# (latent rows (K, ...), step indices (K,), branch indices (K,)) -> model output rows (K, ...)
RowModel = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (outputs (branches, N, ...), step indices (N,)) -> guided directions (N, ...)
Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Problem:
    """Everything the solver needs for one video; built by an adapter's `parataa_problem` from the pipeline."""

    x0: torch.Tensor  # the initial latents, without the batch dimension
    trajectory: Trajectory
    branches: int  # 2 with classifier-free guidance (unconditional, conditional), else 1
    model: RowModel
    combine: Combine
    dtype: torch.dtype = torch.float32  # the model's
    noise: torch.Tensor | None = None  # (steps, ...) drawn up front for stochastic sampling

    def direction(self, rank: int = 0, world_size: int = 1, group=None, max_batch: int | None = None) -> Direction:
        """The batched model call of a round, this rank computing rows [its share] of branches x steps, at most
        `max_batch` rows per model call (None: its whole share in one call)."""

        def evaluate(x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
            n = len(steps)
            total = self.branches * n
            share = -(-total // world_size)  # rows per rank, the last ones padded
            rows = torch.arange(rank * share, min((rank + 1) * share, total))
            branch, position = rows // n, rows % n
            padded = torch.zeros((share, *x.shape[1:]), dtype=self.dtype, device=x.device)
            chunk = max_batch or max(len(rows), 1)  # micro-batches, for a window whose share does not fit at once
            for start in range(0, len(rows), chunk):  # with more ranks than rows, a rank may have none and only pads
                part = slice(start, start + chunk)
                padded[part] = self.model(x[position[part]], steps[position[part]], branch[part])
            out = padded
            if world_size > 1:
                parts = [torch.empty_like(padded) for _ in range(world_size)]
                dist.all_gather(parts, padded, group=group)
                out = torch.cat(parts)
            out = out[:total]
            return self.combine(out.view(self.branches, n, *out.shape[1:]), steps)

        return evaluate
