"""ParaTAA on ranks: every rank holds the whole pipeline; each round's batch is split across them (asyncvid.parataa).

Every rank gathers every row of a round, so every rank takes the same solver update; rank 0's decision on which
steps are final is broadcast as well, so all ranks run the same rounds and stop together.
"""

from __future__ import annotations

import sys
import time
from functools import partial

import torch
import torch.distributed as dist

from .devices import resolve_device, resolve_dtype
from .errors import UsageError
from .generate import package_versions, to_uint8
from .parataa import Round, Solution, solve
from .parataa_config import ParaTAAConfig
from .schedulers import set_scheduler
from .video import Video


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
        direction = problem.direction(rank.rank if rank is not None else 0, world, group)
        agree = partial(_agree, problem.x0.device, group) if world > 1 else None
        solution = solve(problem.x0, problem.trajectory, direction, config, noise=problem.noise, init=init,
                         on_round=on_round, agree=agree)
    return solution.x[None].to(problem.dtype), solution, problem.branches


def _agree(device, group, lo: int) -> int:
    value = torch.tensor([lo], device=device)
    dist.broadcast(value, src=0, group=group)
    return int(value)


def load_parataa(rank, spec):
    """The whole pipeline on this rank (or in this process), sampling with ParaTAA (a `jobs.Loaded`)."""
    from .jobs import Loaded, _metadata
    from .parallel_decode import parallel_decode
    from .pipelines import load_pipeline

    device = rank.device if rank is not None else resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    pipe, adapter, folder = load_pipeline(spec.model, device=device, dtype=dtype, motion_adapter=spec.motion_adapter,
                                          allow_pickle=spec.allow_pickle)
    set_scheduler(pipe, spec.scheduler)
    world = rank.world_size if rank is not None else 1
    sampler = {**spec.sampler.describe(), "devices": world}
    return Loaded(pipe, adapter, spec, _metadata(spec, folder, device, dtype, sampler),
                  decoder=parallel_decode if world > 1 else None, run=partial(_generate, rank))


def _generate(rank, loaded, request, on_step=None) -> Video | None:
    """One video by ParaTAA; the progress counts final steps, and the sidecar records every round."""
    from .resume import settings_of

    config, steps = loaded.spec.sampler, request.num_inference_steps

    rounds = []

    def on_round(r: Round) -> None:
        rounds.append(r)
        if on_step is not None:
            on_step(r.final, steps, f"round {len(rounds)}, residual {r.residual:.2g}")

    start = time.perf_counter()
    latents, solution, branches = sample(loaded.pipe, loaded.adapter, request, config, rank=rank, on_round=on_round)
    loop_end = time.perf_counter()
    with torch.inference_mode():
        if loaded.decoder is not None:
            frames = loaded.decoder(loaded.pipe, loaded.adapter, latents, request)
        else:
            frames = loaded.adapter.decode(loaded.pipe, latents, request, 0, latents.shape[loaded.adapter.FRAME_DIM])
    end = time.perf_counter()
    if frames is None:
        return None
    if not solution.converged:
        print(f"warning: ParaTAA stopped after {len(solution.rounds)} rounds with {solution.rounds[-1].final} of "
              f"{steps} steps final; raise --max-rounds or --tol", file=sys.stderr)
    meta = {
        **request.describe(), **loaded.metadata, "settings": settings_of(request, loaded.spec),
        "versions": package_versions(),
        "timings": {"total_s": round(end - start, 4), "until_last_step_s": round(loop_end - start, 4),
                    "decode_s": round(end - loop_end, 4)},
        "parataa": report(solution, steps, branches),
    }
    return Video(frames=to_uint8(frames), fps=request.fps, metadata=meta)


def report(solution: Solution, steps: int, branches: int = 1) -> dict:
    """What the sidecar records: rounds, model evaluations against sequential sampling's, residual per round."""
    return {
        "rounds": len(solution.rounds),
        "steps": steps,
        "converged": solution.converged,
        "model_evaluations": solution.evaluations * branches,
        "sequential_evaluations": steps * branches,
        "per_round": [{"window": [r.lo, r.hi], "residual": float(f"{r.residual:.4g}"), "final": r.final}
                      for r in solution.rounds],
    }
