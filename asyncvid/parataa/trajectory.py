"""A sampling trajectory as data: x_{i+1} = a_i x_i + b_i D(c_i x_i, t_i) + e_i z_i for steps i = 0 … n-1.

x_0 is the initial noise and x_n the sample; D is the (guided) model output at timestep t_i, given the input scaled by
c_i; z_i is noise drawn up front (e_i = 0 for deterministic samplers). Both first-order samplers the pipelines use are
of this form: DDIM (Song et al., 2021, eq. 12; AnimateDiff) and Euler on the EDM ODE (Karras et al., 2022, Algorithm 1
without churn; SVD). Writing them this way lets ParaTAA unroll any number of steps without `scheduler.step()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from asyncvid.errors import UsageError

Direction = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x rows (N, ...), steps (N,)) -> D rows


@dataclass(frozen=True)
class Trajectory:
    """Per-step coefficients (float64, length n) and the timesteps the model is conditioned on."""

    timesteps: torch.Tensor  # t_i, in the scheduler's own units (discrete or continuous)
    a: torch.Tensor  # weight of x_i
    b: torch.Tensor  # weight of the model output D_i
    e: torch.Tensor  # weight of the noise z_i (0: deterministic)
    input_scale: torch.Tensor  # c_i: the model sees c_i x_i (the scheduler's scale_model_input)
    noise_scale: torch.Tensor  # the ancestral (eta = 1) noise std of step i: ParaTAA's tolerances are relative to it
    # The clean sample the model predicts at step i: x̂_i = clean_x_i x_i + clean_d_i D_i (x_0-prediction)
    clean_x: torch.Tensor
    clean_d: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.a)

    @property
    def stochastic(self) -> bool:
        return bool((self.e != 0).any())


def from_scheduler(scheduler, num_inference_steps: int, *, eta: float = 0.0, device=None) -> Trajectory:
    """The trajectory of a diffusers DDIM or Euler scheduler after `set_timesteps` (which this calls)."""
    if isinstance(scheduler, DDIMScheduler):
        return ddim(scheduler, num_inference_steps, eta=eta, device=device)
    if isinstance(scheduler, EulerDiscreteScheduler):
        if eta:
            raise UsageError(f"eta {eta} needs DDIM; this model samples with Euler (deterministic); drop --eta")
        return euler(scheduler, num_inference_steps, device=device)
    raise UsageError(
        f"ParaTAA supports the DDIM and Euler schedulers, not {type(scheduler).__name__}; "
        f"drop --scheduler or use --scheduler ddim (AnimateDiff) / euler (SVD)"
    )


def ddim(scheduler: DDIMScheduler, n: int, *, eta: float = 0.0, device=None) -> Trajectory:
    """DDIM with diffusers' conventions: previous timestep t - T/n, final alpha from `set_alpha_to_one`."""
    config = scheduler.config
    if config.clip_sample or config.thresholding:
        raise UsageError("ParaTAA needs a DDIM step linear in the model output; disable clip_sample and thresholding")
    scheduler.set_timesteps(n, device=device)
    t = scheduler.timesteps.to("cpu", torch.long)
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    prev = t - config.num_train_timesteps // n
    alpha_t = alphas[t]
    alpha_p = torch.where(prev >= 0, alphas[prev.clamp(min=0)], torch.tensor(float(scheduler.final_alpha_cumprod),
                                                                             dtype=torch.float64))
    ancestral = ((1 - alpha_p) / (1 - alpha_t) * (1 - alpha_t / alpha_p)).clamp(min=0).sqrt()
    sigma = eta * ancestral
    keep = (1 - alpha_p - sigma**2).clamp(min=0).sqrt()  # weight of the predicted noise in x_{i+1}
    if config.prediction_type == "epsilon":  # x̂ = (x - sqrt(1 - alpha) eps) / sqrt(alpha)
        a = (alpha_p / alpha_t).sqrt()
        b = keep - (alpha_p * (1 - alpha_t) / alpha_t).sqrt()
        clean_x, clean_d = 1 / alpha_t.sqrt(), -((1 - alpha_t) / alpha_t).sqrt()
    elif config.prediction_type == "v_prediction":  # x̂ = sqrt(alpha) x - sqrt(1 - alpha) v
        a = (alpha_p * alpha_t).sqrt() + keep * (1 - alpha_t).sqrt()
        b = keep * alpha_t.sqrt() - (alpha_p * (1 - alpha_t)).sqrt()
        clean_x, clean_d = alpha_t.sqrt(), -(1 - alpha_t).sqrt()
    else:
        raise UsageError(f"ParaTAA's DDIM supports epsilon and v_prediction models, not {config.prediction_type}")
    ones = torch.ones(n, dtype=torch.float64)
    return Trajectory(scheduler.timesteps, a, b, sigma, ones, _floored(ancestral), clean_x, clean_d)


def euler(scheduler: EulerDiscreteScheduler, n: int, *, device=None) -> Trajectory:
    """Euler steps on the probability-flow ODE in sigma (EDM), as `EulerDiscreteScheduler` takes them without churn."""
    scheduler.set_timesteps(n, device=device)
    sigmas = scheduler.sigmas.to("cpu", torch.float64)
    s, s_next = sigmas[:-1], sigmas[1:]
    dt = s_next - s
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":  # x_0 = x / (s^2 + 1) - v s / sqrt(s^2 + 1)
        a = 1 + dt * s / (s**2 + 1)
        b = dt / (s**2 + 1).sqrt()
        clean_x, clean_d = 1 / (s**2 + 1), -s / (s**2 + 1).sqrt()
    elif kind == "epsilon":  # x_0 = x - s eps
        a = torch.ones_like(s)
        b = dt
        clean_x, clean_d = torch.ones_like(s), -s
    else:
        raise UsageError(f"ParaTAA's Euler supports epsilon and v_prediction models, not {kind}")
    scale = 1 / (s**2 + 1).sqrt()  # scale_model_input
    ancestral = (s_next**2 * (s**2 - s_next**2) / s**2).clamp(min=0).sqrt()  # k-diffusion's sigma_up
    return Trajectory(scheduler.timesteps, a, b, torch.zeros(n, dtype=torch.float64), scale, _floored(ancestral),
                      clean_x, clean_d)


def _floored(scale: torch.Tensor) -> torch.Tensor:
    """A step into sigma 0 has no ancestral noise; measure it against the finest positive scale of the schedule."""
    positive = scale[scale > 0]
    return scale.clamp(min=float(positive.min()) if len(positive) else 1.0)


def step(traj: Trajectory, i: int, x: torch.Tensor, d: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """x_{i+1} from x_i and the model output D_i."""
    out = traj.a[i] * x + traj.b[i] * d
    return out if z is None or traj.e[i] == 0 else out + traj.e[i] * z


def sample_sequential(x0: torch.Tensor, traj: Trajectory, direction: Direction, noise: torch.Tensor | None = None,
                      callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """The sequential sampler: n model calls, one step each (the reference ParaTAA converges to)."""
    x = x0.to(torch.float64)
    for i in range(traj.steps):
        d = direction(x.unsqueeze(0), torch.tensor([i]))[0].to(torch.float64)
        x = step(traj, i, x, d, None if noise is None else noise[i])
        if callback is not None:
            callback(i + 1)
    return x
