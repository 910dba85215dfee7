"""ParaTAA on ranks: every rank holds the whole pipeline; each round's batch is split across them (solver.py).

Every rank gathers every row of a round, so every rank takes the same solver update; rank 0's decision on which
steps are final is broadcast as well, so all ranks run the same rounds and stop together.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.distributed as dist

from asyncvid.errors import UsageError
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.parataa.solver import Solution, solve


def sample(pipe, adapter, request, config: ParaTAAConfig, *, rank=None, group=None, on_round=None,
           init: torch.Tensor | None = None) -> tuple[torch.Tensor, Solution, int]:
    """The final latents (batch of 1, the model's dtype), the solver's record, and the model rows per step (2 with
    classifier-free guidance); the same on every rank."""
    config.check_steps(request.num_inference_steps)
    if not hasattr(adapter, "parataa_problem"):
        raise UsageError(f"ParaTAA has no problem builder for {adapter.__name__}; use --sampler sequential")
    world = rank.world_size if rank is not None else 1
    # A CPU generator gives the same noise on every device, as the sequential sampler's does.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    with torch.inference_mode():
        problem = adapter.parataa_problem(pipe, request, generator=generator, eta=config.eta)
        direction = problem.direction(rank.rank if rank is not None else 0, world, group, config.max_batch)
        agree = partial(_agree, problem.x0.device, group) if world > 1 else None
        solution = solve(problem.x0, problem.trajectory, direction, config, noise=problem.noise, init=init,
                         on_round=on_round, agree=agree)
    return solution.x[None].to(problem.dtype), solution, problem.branches


def _agree(device, group, lo: int) -> int:
    value = torch.tensor([lo], device=device)
    dist.broadcast(value, group=group, group_src=0)
    return int(value)


def report(solution: Solution, steps: int, branches: int = 1) -> dict:
    """What the sidecar records: rounds, model evaluations against sequential sampling's, residual per round."""
    return {
        "rounds": len(solution.rounds),
        "steps": steps,
        "converged": solution.converged,
        "model_evaluations": solution.evaluations * branches,
        "sequential_evaluations": steps * branches,
        "branches": branches,
        "per_round": [{"window": [r.lo, r.hi], "residual": float(f"{r.residual:.4g}"), "final": r.final,
                       "change": float(f"{r.change:.4g}") if math.isfinite(r.change) else None}
                      for r in solution.rounds],
    }
