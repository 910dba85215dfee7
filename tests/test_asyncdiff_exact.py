"""AsyncDiff on real gloo groups equals its single-process specification (asyncvid.asyncdiff.oracle) bit for bit.

Past warm-up AsyncDiff is approximate, so sequential sampling cannot be the reference; the oracle runs the same
schedule (warm-up relay, rounds on the previous round's tensors, stride replicas, time shift, the CFG split) in one
process on the same stage functions. One thread per process on both sides: on a CPU the thread count changes float
rounding. The ranks exchange tensors untagged, in one fixed order (what NCCL needs), so these runs also prove the
exchange's order.
"""

import pytest
import torch

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.oracle import apply_oracle
from asyncvid.asyncdiff.setup import flops_plan
from asyncvid.bench.measure import asyncdiff_sample
from asyncvid.pipelines import units_for
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import ModelSpec, load_sampler
from asyncvid.training.animatediff import GUIDANCE, NOISE_MEAN, SHARED_GRID, SHARED_NOISE

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
STEPS = 5


def _request(family: str, red_circle, steps: int = STEPS):
    size = dict(num_inference_steps=steps, num_frames=4, height=64, width=64, seed=2)
    if family == "svd":
        return "tiny-svd", ImageToVideo(red_circle, **size)
    # The model's own settings, as the CLI samples it (shared noise: its frames start from common noise, since round
    # 39 one draw for all; noise mean 0: its means are zero).
    return "tiny-animatediff", TextToVideo("a blue square moving up", guidance_scale=GUIDANCE,
                                           shared_noise=SHARED_NOISE, noise_mean=NOISE_MEAN, shared_grid=SHARED_GRID,
                                           **size)


def oracle_latents(model: str, request, config: AsyncDiffConfig, scheduler: str | None = None) -> torch.Tensor:
    """The schedule run in this process on the whole UNet, split by the same FLOPs plan the ranks make."""
    with launch.cpu_threads(1, CPU):
        loaded = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32", scheduler=scheduler))
        unet = loaded.pipe.unet
        family = units_for(unet)
        shape = {"frames": request.num_frames, "height": request.height, "width": request.width}
        _, plan = flops_plan(unet, family, config, shape)
        apply_oracle(unet, family.build_program(unet), plan, config, loaded.pipe.scheduler)
        return loaded.sample(request).latents


REFRESH_EVERY_STEP = "svd-n2-w1-refresh1"
CASES = {
    # id: (family, scheduler, config). Each option is here on real ranks at least once, most with each family; the
    # cases are combinations rather than one option at a time because each costs a trace and a run on every rank.
    "svd-n2-w1": ("svd", None, dict(stages=2, warmup=1)),
    "animatediff-n2-w2": ("animatediff", None, dict(stages=2, warmup=2)),
    "svd-n2-w2-shift": ("svd", None, dict(stages=2, warmup=2, time_shift=True)),
    "svd-n4-w1": ("svd", None, dict(stages=4, warmup=1)),
    "svd-n2-s2-w1": ("svd", None, dict(stages=2, stride=2, warmup=1)),  # rounds of 2 steps, then 1
    "animatediff-n2-s2-w2-shift": ("animatediff", None, dict(stages=2, stride=2, warmup=2, time_shift=True)),
    "animatediff-n3-s2-w1": ("animatediff", None, dict(stages=3, stride=2, warmup=1)),
    "animatediff-cfg-w1": ("animatediff", None, dict(stages=1, warmup=1, cfg_parallel=True)),
    "svd-cfg-n2-w1": ("svd", None, dict(stages=2, warmup=1, cfg_parallel=True)),
    "animatediff-euler-n2-w1": ("animatediff", "euler", dict(stages=2, warmup=1)),
    "animatediff-dpm-n2-s2-w1": ("animatediff", "dpm-solver", dict(stages=2, stride=2, warmup=1)),
    # The cases above extrapolate the stale inputs (the default); the paper's reuse of them as they are:
    "animatediff-n3-s2-w1-reuse": ("animatediff", None, dict(stages=3, stride=2, warmup=1, stale="reuse")),
    "svd-cfg-n2-w1-reuse": ("svd", None, dict(stages=2, warmup=1, cfg_parallel=True, stale="reuse")),
    # A synchronous refresh step every 3 steps after warm-up (step 3; every step: the test below).
    "animatediff-n3-w1-refresh3": ("animatediff", None, dict(stages=3, warmup=1, refresh=3)),
    # Every step: the run is sequential sampling, the reference of its own test below (not the oracle's).
    REFRESH_EVERY_STEP: ("svd", None, dict(stages=2, warmup=1, refresh=1)),
}


def _config(case: str) -> AsyncDiffConfig:
    return AsyncDiffConfig(cost="flops", **CASES[case][2])


def _cases_on_ranks(rank, cases: list[str], red_circle) -> dict[str, torch.Tensor] | None:
    """AsyncDiff latents of each case, one after another on the same ranks (call through `launch.run`)."""
    latents = {}
    for case in cases:
        family, scheduler, _ = CASES[case]
        model, request = _request(family, red_circle)
        sample = asyncdiff_sample(rank, model, request, _config(case), torch.float32, 1, scheduler)
        if sample is not None:
            latents[case] = sample.latents
    return latents if rank.rank == 0 else None


@pytest.fixture(scope="module")
def distributed(red_circle, one_launch_per_world):
    """A case's latents on real ranks; the cases of one world size share one launch (more than a 5-step run
    costs)."""
    return one_launch_per_world(_cases_on_ranks, list(CASES), lambda case: _config(case).world_size, red_circle)


@pytest.mark.parametrize("case", [case for case in CASES if case != REFRESH_EVERY_STEP])
def test_distributed_asyncdiff_equals_the_oracle(case, red_circle, distributed):
    family, scheduler, _ = CASES[case]
    model, request = _request(family, red_circle)
    want = oracle_latents(model, request, _config(case), scheduler)
    got = distributed(case)
    assert torch.equal(got, want), f"{case}: max difference {(got - want).abs().max().item():.3g}"


def test_the_oracle_is_sequential_sampling_when_warmup_covers_every_step(red_circle):
    model, request = _request("animatediff", red_circle, steps=3)
    with launch.cpu_threads(1, CPU):
        reference = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).latents
    assert torch.equal(oracle_latents(model, request, AsyncDiffConfig(stages=3, warmup=3)), reference)


def test_refresh_every_step_is_sequential_sampling_on_real_ranks(red_circle, distributed):
    """refresh=1 makes every step after warm-up a relay: the run is sequential sampling, bit for bit."""
    model, request = _request("svd", red_circle)
    with launch.cpu_threads(1, CPU):
        reference = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).latents
    assert torch.equal(distributed(REFRESH_EVERY_STEP), reference)


def test_the_oracle_past_warmup_is_not_sequential_sampling(red_circle):
    """The schedule is approximate after warm-up: an oracle that secretly ran the sequential forward would fail."""
    model, request = _request("svd", red_circle, steps=3)
    with launch.cpu_threads(1, CPU):
        reference = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).latents
    assert not torch.equal(oracle_latents(model, request, AsyncDiffConfig(stages=2, warmup=1)), reference)


def test_extrapolated_inputs_are_closer_to_sequential_sampling_than_reused_ones(red_circle):
    """The fidelity option's reason to be the default: same schedule, same split, only the stale inputs differ."""
    model, request = _request("svd", red_circle, steps=10)
    with launch.cpu_threads(1, CPU):
        reference = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).latents
    error = {stale: float((oracle_latents(model, request, AsyncDiffConfig(cost="flops", warmup=2, stale=stale))
                           - reference).pow(2).mean().sqrt()) for stale in ("reuse", "extrapolate")}
    assert error["extrapolate"] < error["reuse"] / 1.4, error  # at least 3 dB closer
