"""ParaTAA's solver and the trajectory coefficients, on a toy nonlinear denoiser (no model, no processes)."""

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from asyncvid.errors import UsageError
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.parataa.solver import solve
from asyncvid.parataa.trajectory import from_scheduler, sample_sequential

SHAPE = (4, 3, 5, 5)  # channels, frames, height, width: a video latent without the batch dimension
# The paper's iteration alone: the noise copied as the first trajectory, only the relative per-step rule to stop.
PLAIN = dict(start="noise", sample_tol=None, atol=0.0)


def ddim(prediction_type="epsilon"):
    return DDIMScheduler(beta_schedule="linear", clip_sample=False, timestep_spacing="linspace", steps_offset=1,
                         set_alpha_to_one=True, prediction_type=prediction_type)


def ddim_zero_snr(prediction_type="v_prediction"):
    """The embedded tiny-animatediff's schedule: zero terminal SNR (alpha_bar = 0 at the first step), trailing."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False,
                         timestep_spacing="trailing", steps_offset=1, set_alpha_to_one=True,
                         rescale_betas_zero_snr=True, prediction_type=prediction_type)


def euler(prediction_type="v_prediction"):
    if prediction_type == "epsilon":  # Stable Diffusion's Euler: discrete timesteps, sigmas from the betas
        return EulerDiscreteScheduler(beta_schedule="scaled_linear", use_karras_sigmas=True)
    return EulerDiscreteScheduler(beta_schedule="scaled_linear", prediction_type=prediction_type,  # SVD's
                                  use_karras_sigmas=True, sigma_min=0.002, sigma_max=700.0, timestep_type="continuous",
                                  timestep_spacing="leading", steps_offset=1)


class Toy:
    """A smooth nonlinear 'denoiser' whose output depends on the step, so the trajectory is a real nonlinear system."""

    def __init__(self, traj, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(SHAPE[0], SHAPE[0], generator=g, dtype=torch.float64) / SHAPE[0] ** 0.5
        self.traj = traj
        self.calls = 0

    def __call__(self, x, steps):
        self.calls += len(steps)
        x = x.to(torch.float64) * self.traj.input_scale[steps].view(-1, *[1] * len(SHAPE))
        t = (self.traj.timesteps.to(torch.float64)[steps] / 1000).view(-1, *[1] * len(SHAPE))
        # Like a noise predictor at unit input scale: mostly the input, plus a step-dependent nonlinearity.
        return 0.8 * x + 0.3 * torch.tanh(torch.einsum("ij,nj...->ni...", self.mix, x) * (1 + t))


def start(seed=1, scale=1.0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def rel_error(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("make, kind", [(ddim, "epsilon"), (ddim, "v_prediction"), (ddim_zero_snr, "v_prediction"),
                                        (euler, "v_prediction"), (euler, "epsilon")])
def test_coefficients_reproduce_scheduler_steps(make, kind):
    """The linear form x_{i+1} = a x_i + b D_i is what `scheduler.step` computes (its alphas are float32)."""
    n = 12
    traj = from_scheduler(make(kind), n)
    reference = make(kind)
    reference.set_timesteps(n)
    x0 = start(scale=float(reference.init_noise_sigma))
    toy = Toy(traj)
    x = x0.clone()
    for i, t in enumerate(reference.timesteps):
        x = reference.step(toy(x[None], torch.tensor([i]))[0], t, x).prev_sample
    assert rel_error(sample_sequential(x0, traj, toy), x) < 1e-6


def test_stochastic_ddim_matches_scheduler_with_the_same_noise():
    n, eta = 10, 0.7
    traj = from_scheduler(ddim(), n, eta=eta)
    reference = ddim()
    reference.set_timesteps(n)
    noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x0, toy = start(), Toy(traj)
    x = x0.clone()
    for i, t in enumerate(reference.timesteps):
        d = toy(x[None], torch.tensor([i]))[0]
        x = reference.step(d, t, x, eta=eta, variance_noise=noise[i]).prev_sample
    assert rel_error(sample_sequential(x0, traj, toy, noise), x) < 1e-6


def jacobi(x0, traj, toy, rounds):
    """Plain Jacobi iteration, written independently: every x_{i+1} <- step_i(x_i) from the previous iterate."""
    n = traj.steps
    xs = [x0.clone() for _ in range(n + 1)]
    for _ in range(rounds):
        d = toy(torch.stack(xs[:-1]), torch.arange(n))
        xs = [x0] + [traj.a[i] * xs[i] + traj.b[i] * d[i] for i in range(n)]
    return torch.stack(xs)


@pytest.mark.parametrize("rounds", [1, 2, 3, 5])
def test_order_one_without_history_is_jacobi(rounds):
    n = 10
    traj = from_scheduler(ddim(), n)
    x0 = start()
    config = ParaTAAConfig(order=1, history=1, tol=1e-12, max_rounds=rounds, **PLAIN)
    got = solve(x0, traj, Toy(traj), config).trajectory
    want = jacobi(x0, traj, Toy(traj), rounds)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert not torch.allclose(got, jacobi(x0, traj, Toy(traj), rounds + 1), atol=1e-6)  # the comparison can fail


@pytest.mark.parametrize("make", [ddim, euler])
def test_converges_to_the_sequential_sample_in_fewer_rounds(make):
    n = 25
    traj = from_scheduler(make(), n)
    x0 = start(scale=float(traj.noise_scale.max()) if make is euler else 1.0)
    want = sample_sequential(x0, traj, Toy(traj))
    got = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-3, **PLAIN))
    assert got.converged
    assert len(got.rounds) < n * 3 // 4
    assert rel_error(got.x, want) < 1e-3
    loose = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=0.1, **PLAIN))  # a looser tolerance: fewer rounds, farther off
    assert len(loose.rounds) < len(got.rounds) and rel_error(loose.x, want) > rel_error(got.x, want)
    assert got.evaluations == sum(r.hi - r.lo for r in got.rounds)


def test_anderson_acceleration_needs_fewer_rounds_than_fixed_point():
    n = 25
    traj = from_scheduler(ddim(), n)
    x0 = start()
    plain = solve(x0, traj, Toy(traj), ParaTAAConfig(history=1, tol=0.02, **PLAIN))
    accelerated = solve(x0, traj, Toy(traj), ParaTAAConfig(history=3, tol=0.02, **PLAIN))
    assert accelerated.converged and plain.converged
    assert len(accelerated.rounds) < len(plain.rounds)


def test_exact_with_a_window_of_one():
    """A one-step window is the sequential sampler, one step per round."""
    n = 8
    traj = from_scheduler(ddim(), n)
    x0 = start()
    got = solve(x0, traj, Toy(traj), ParaTAAConfig(window=1, **PLAIN))
    assert len(got.rounds) == n
    assert rel_error(got.x, sample_sequential(x0, traj, Toy(traj))) < 1e-12


def test_stochastic_sampling_converges_with_noise_drawn_up_front():
    n = 20
    traj = from_scheduler(ddim(), n, eta=1.0)
    noise = torch.randn((n, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x0 = start()
    got = solve(x0, traj, Toy(traj), ParaTAAConfig(eta=1.0, tol=1e-3, **PLAIN), noise=noise)
    assert got.converged
    assert rel_error(got.x, sample_sequential(x0, traj, Toy(traj), noise)) < 1e-3


def test_a_stored_trajectory_starts_converged():
    n = 20
    traj = from_scheduler(ddim(), n)
    x0 = start()
    first = solve(x0, traj, Toy(traj), ParaTAAConfig(**PLAIN))
    again = solve(x0, traj, Toy(traj), ParaTAAConfig(**PLAIN), init=first.trajectory)
    assert len(again.rounds) == 1 and again.converged
    # A variation (other conditioning) solves only the last steps, starting from the stored ones.
    other = Toy(traj, seed=9)
    variation = solve(x0, traj, other, ParaTAAConfig(variation_steps=5, **PLAIN), init=first.trajectory)
    assert variation.rounds[0].lo == n - 5
    assert torch.equal(variation.trajectory[: n - 5 + 1], first.trajectory[: n - 5 + 1])


def test_max_rounds_stops_unconverged():
    traj = from_scheduler(ddim(), 20)
    got = solve(start(), traj, Toy(traj), ParaTAAConfig(max_rounds=2, tol=1e-9, **PLAIN))
    assert len(got.rounds) == 2 and not got.converged


@pytest.mark.parametrize("kwargs, fragment", [
    ({"order": 0}, "--order 1"), ({"window": 0}, "--window 1"), ({"history": 0}, "--history 1"),
    ({"tol": 0}, "--tol"), ({"max_rounds": 0}, "--max-rounds 1"), ({"eta": 2}, "--eta 0"), ({"atol": -1}, "--atol"),
    ({"sample_tol": -1}, "--sample-tol"), ({"start": "zeros"}, "jump, noise"), ({"max_batch": 0}, "--max-batch 1"),
])
def test_config_validates_itself(kwargs, fragment):
    with pytest.raises(UsageError, match=fragment):
        ParaTAAConfig(**kwargs)


def test_euler_refuses_eta():
    with pytest.raises(UsageError, match="drop --eta"):
        from_scheduler(euler(), 10, eta=0.5)


class ConstantClean:
    """A denoiser that predicts the same clean sample at every step: the trajectory the jump start assumes."""

    def __init__(self, traj, clean):
        self.traj, self.clean, self.calls = traj, clean, 0

    def __call__(self, x, steps):
        self.calls += len(steps)
        shape = (-1, *[1] * len(SHAPE))
        return (self.clean - self.traj.clean_x[steps].view(shape) * x) / self.traj.clean_d[steps].view(shape)


@pytest.mark.parametrize("make, kind", [(ddim, "epsilon"), (ddim_zero_snr, "v_prediction"), (euler, "v_prediction"),
                                        (euler, "epsilon")])
def test_the_jump_start_is_exact_when_the_clean_prediction_does_not_change(make, kind):
    """x̂ = clean_x x + clean_d D for every sampler form; with a model whose x̂ is constant, the first trajectory is
    already the sequential one, so the second round finds every step converged. The paper's start needs more."""
    n = 12
    traj = from_scheduler(make(kind), n)
    x0 = start(scale=float(traj.noise_scale.max()) if make is euler else 1.0)
    model = ConstantClean(traj, start(seed=4))
    want = sample_sequential(x0, traj, model)
    config = ParaTAAConfig(tol=1e-9, atol=0.0, sample_tol=None)
    got = solve(x0, traj, model, config)
    assert got.rounds[0].hi - got.rounds[0].lo == 1 and got.evaluations == 1 + (n - 1)  # one row, then the rest
    assert len(got.rounds) == 2 and got.converged
    assert rel_error(got.x, want) < 1e-9
    assert len(solve(x0, traj, model, ParaTAAConfig(tol=1e-9, atol=0.0, sample_tol=None, start="noise")).rounds) > 2


def test_the_jump_start_converges_to_the_sequential_sample():
    n = 25
    for make in (ddim, euler):
        traj = from_scheduler(make(), n)
        x0 = start(scale=float(traj.noise_scale.max()) if make is euler else 1.0)
        got = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-6, atol=0.0, sample_tol=None))
        assert got.converged and rel_error(got.x, sample_sequential(x0, traj, Toy(traj))) < 1e-5


def test_sample_tol_stops_once_the_sample_settles():
    """The solve ends at the first round that moves x_n by at most sample_tol (rms), before every step is final."""
    n = 25
    traj = from_scheduler(ddim(), n)
    x0 = start()
    want = sample_sequential(x0, traj, Toy(traj))
    strict = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-9, atol=0.0, sample_tol=None))
    got = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-9, atol=0.0, sample_tol=1e-3))
    changes = [r.change for r in got.rounds]
    assert changes[-1] <= 1e-3 < min(changes[:-1]), changes
    assert got.converged and got.rounds[-1].final == n
    assert len(got.rounds) < len(strict.rounds)
    assert rel_error(got.x, want) < 1e-2  # close, not exact: that is the trade


def test_a_step_is_final_within_either_tolerance():
    """The paper's rule: within atol (absolute) or tol x the step's noise scale; a huge atol ends the solve at once."""
    n = 10
    traj = from_scheduler(ddim(), n)
    x0 = start()
    relative_only = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-9, atol=0.0, sample_tol=None))
    either = solve(x0, traj, Toy(traj), ParaTAAConfig(tol=1e-9, atol=1e9, sample_tol=None))
    assert len(either.rounds) == 2 and either.converged  # the jump, then one round in which every step is final
    assert len(relative_only.rounds) > 2


def test_micro_batches_give_the_whole_batch_result():
    """A round's rows in calls of at most max_batch rows: every row once, the same outputs (a row-wise model)."""
    from asyncvid.parataa.problem import Problem

    n = 7
    traj = from_scheduler(ddim(), n)
    toy, calls = Toy(traj), []

    def model(x, steps, branch):
        calls.append(len(steps))
        # Row by row, so a row's floats do not depend on the batch it came in (a batched einsum's kernel does).
        rows = torch.cat([toy(x[i:i + 1], steps[i:i + 1]) for i in range(len(steps))])
        return rows * (1 + branch.to(x.dtype).view(-1, *[1] * len(SHAPE)))

    problem = Problem(start(), traj, 2, model, lambda out, steps: out[0] + 2 * (out[1] - out[0]), torch.float64)
    x, steps = start(seed=3).expand(n, *SHAPE).clone(), torch.arange(n)
    whole = problem.direction()(x, steps)
    assert calls == [2 * n]
    calls.clear()
    parts = problem.direction(max_batch=3)(x, steps)
    assert calls == [3, 3, 3, 3, 2] and torch.equal(parts, whole)


def test_the_sample_rule_waits_for_an_estimate_of_the_sample():
    """With a window shorter than the run, x_n first holds a copy of an earlier step: its change against that copy
    says nothing, so the solve must not stop on it (the noise start, where no jump fills the trajectory)."""
    n = 20
    traj = from_scheduler(ddim(), n)
    x0 = start()
    got = solve(x0, traj, Toy(traj), ParaTAAConfig(window=5, start="noise", sample_tol=1e9))
    reaching = next(i for i, r in enumerate(got.rounds) if r.hi == n)
    assert got.rounds[reaching].change == float("inf") and len(got.rounds) == reaching + 2
    assert ParaTAAConfig(sample_tol=0).sample_tol is None  # 0 is off, from Python as on the command line
