"""Choosing the sampler's scheduler: the pipeline's own (Euler for SVD, DDIM for AnimateDiff) or another diffusers
scheduler built from the same config, so the noise schedule and prediction type carry over."""

from __future__ import annotations

from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from asyncvid.errors import UsageError

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "ddim": DDIMScheduler,
    "dpm-solver": DPMSolverMultistepScheduler,  # DPM-Solver++ (2M), multistep
}


def set_scheduler(pipe, name: str | None) -> None:
    """Replace `pipe.scheduler` by the named one (None keeps the pipeline's own)."""
    if name is None:
        return
    check_scheduler(name, pipe.scheduler.config)
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


def check_scheduler(name: str | None, config: dict) -> None:
    """Whether the named scheduler can replace one with `config` (read from the pipeline, or from its folder's
    scheduler_config.json before anything loads)."""
    if name is None:
        return
    if name not in SCHEDULERS:
        raise UsageError(f"scheduler '{name}' is not supported; use one of {', '.join(SCHEDULERS)}")
    if config.get("timestep_type") == "continuous" and SCHEDULERS[name] is not EulerDiscreteScheduler:
        # SVD's UNet is conditioned on continuous (EDM) noise levels, which only Euler here produces.
        raise UsageError(
            f"scheduler '{name}' gives discrete timesteps, but this model samples on continuous ones (as SVD does); "
            f"drop --scheduler or use --scheduler euler"
        )
