"""The cost model's arithmetic on hand-made stages, the link fit, the split of a real tiny UNet, and the full-size
configs the benchmark projects to."""

import json
import math
from pathlib import Path

import pytest
import torch

from asyncvid.asyncdiff.costs import fake_trace
from asyncvid.asyncdiff.plan import make_plan, transfer_bytes, transfers
from asyncvid.bench import costmodel
from asyncvid.bench.archs import ANIMATEDIFF_SD15, SVD_XT
from asyncvid.bench.costmodel import Link, Stages

DATA = Path(__file__).resolve().parent / "data"
LINK = Link(latency_s=0.01, bandwidth=1000.0)  # 10 ms + 1 s per 1000 bytes: easy to add up by hand
TWO = Stages(compute_s=(1.0, 0.6), weight_bytes=(3, 1), crossing={(0, 1): 1000}, eps_bytes=100)


def test_link_time_and_broadcast():
    assert LINK.time(0) == 0.0
    assert LINK.time(500) == pytest.approx(0.51)
    assert LINK.broadcast(100, 1) == 0.0
    assert LINK.broadcast(100, 2) == pytest.approx(0.11)
    assert LINK.broadcast(100, 3) == pytest.approx(0.22)  # a binary tree: two hops
    with pytest.raises(ValueError, match="bandwidth > 0"):
        Link(0.0, 0.0)


def test_fit_link_recovers_latency_and_bandwidth():
    sizes = [4, 2**16, 2**20, 2**22]
    fitted = costmodel.fit_link(sizes, [20e-6 + s / 3e9 for s in sizes])
    assert fitted.latency_s == pytest.approx(20e-6, rel=1e-6)
    assert fitted.bandwidth == pytest.approx(3e9, rel=1e-6)


def test_asyncdiff_round_relay_and_loop():
    # Round: slowest stage 1.0, then stage 0 sends 1000 B (1.01), then the noise prediction is broadcast (0.11).
    assert costmodel.asyncdiff_round(TWO, LINK) == pytest.approx(2.12)
    # Stride 2: stage 0 sends to both last-stage replicas (2000 B), two broadcasts over 3 ranks (2 hops each).
    assert costmodel.asyncdiff_round(TWO, LINK, stride=2) == pytest.approx(1.0 + 2.01 + 2 * 0.22)
    # Warm-up: the stages one after the other, stage 1 waiting for its 1000 B.
    assert costmodel.asyncdiff_relay(TWO, LINK) == pytest.approx(1.6 + 1.01 + 0.11)
    loop = costmodel.asyncdiff_loop(TWO, LINK, steps=10, warmup=3, stride=2, other_s=0.5)
    assert loop == pytest.approx(0.5 + 3 * costmodel.asyncdiff_relay(TWO, LINK, 2)
                                 + math.ceil(7 / 2) * costmodel.asyncdiff_round(TWO, LINK, 2))
    # Warm-up over every step is sequential sampling plus the relay's transfers.
    everything = costmodel.asyncdiff_loop(TWO, LINK, steps=4, warmup=9, stride=1, other_s=0.0)
    assert everything == pytest.approx(4 * (1.6 + 1.01 + 0.11))


def test_cfg_parallel_and_parataa_arithmetic():
    assert costmodel.cfg_parallel_step(0.4, 200, LINK) == pytest.approx(0.4 + 0.11)
    # Windows of 4 and 2 steps, 2 branches, on 3 devices: shares of 3 and 2 rows, each gathered from 2 others.
    loop = costmodel.parataa_loop([4, 2], 2, row_s=0.1, row_bytes=10, link=LINK, devices=3, other_s=1.0)
    assert loop == pytest.approx(1.0 + (3 * 0.1 + 2 * LINK.time(30)) + (2 * 0.1 + 2 * LINK.time(20)))
    assert costmodel.parataa_loop([4], 2, 0.1, 10, LINK, 1, 0.0) == pytest.approx(0.8)  # one device: no gather
    assert costmodel.error(1.1, 1.0) == pytest.approx(0.1)


def test_split_of_a_tiny_unet_counts_every_crossing_tensor():
    from asyncvid.pipelines import unet_inputs
    from asyncvid.pipelines.tiny_models import build_tiny_svd

    unet = build_tiny_svd().unet.eval()
    traced = fake_trace(unet, unet_inputs.SVD, dict(frames=2, height=64, width=64))
    program, profiles = traced.program, traced.profiles
    times = [float(i % 3 + 1) for i in range(len(profiles))]
    for n in (2, 3):
        stages = costmodel.split(profiles, times, program, n, profiles[-1].out_bytes)
        plan = make_plan([p.name for p in profiles], times, n)
        assert list(stages.compute_s) == [sum(times[i] for i in plan.units(k)) for k in range(n)]
        assert sum(stages.weight_bytes) == sum(p.param_bytes for p in profiles)
        assert sum(stages.crossing.values()) == sum(transfer_bytes(plan, profiles, m)[1]
                                                    for m in transfers(plan, program))
        assert all(src < dst for src, dst in stages.crossing)
        assert stages.eps_bytes == 2 * 2 * 4 * 8 * 8 * 4  # batch 2 x frames 2 x 4 channels x 8 x 8 float32


@pytest.mark.parametrize("name, config", [("svd_xt_unet.json", SVD_XT),
                                          ("animatediff_sd15_v152_unet.json", ANIMATEDIFF_SD15)])
def test_full_size_configs_match_the_published_ones(name, config):
    published = {k: v for k, v in json.loads((DATA / name).read_text()).items() if not k.startswith("_")}
    assert config == published


def test_fake_costs_of_a_full_size_unet_cost_no_memory():
    from asyncvid.bench.archs import ARCHS, project

    arch = ARCHS[1]  # AnimateDiff: 1.3B parameters, profiled on fake tensors
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    profiles, unit_s, stages = project(arch, (2,), rate=1e12, element_bytes=2)
    assert sum(p.param_bytes for p in profiles) > 4 * 2**30  # float32 weights of the real model: 4.9 GiB
    assert sum(stages[2].weight_bytes) == sum(p.param_bytes for p in profiles) // 2  # counted at float16
    assert unit_s == pytest.approx([p.flops / 1e12 for p in profiles])
    assert max(stages[2].compute_s) <= 1.1 * sum(unit_s) / 2  # balanced
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before


def test_a_process_traces_an_architecture_at_a_shape_once(monkeypatch):
    """fake_trace keeps its latest traces: the same architecture and shape again is not traced and gives what a
    fresh trace gives; FLOPs asked of a trace made without them, or another shape, trace anew."""
    from asyncvid.asyncdiff import costs
    from asyncvid.pipelines import unet_inputs
    from asyncvid.pipelines.tiny_models import build_tiny_svd

    unet = build_tiny_svd().unet.eval()
    real, made = costs.trace, []
    monkeypatch.setattr(costs, "trace", lambda *a, flops: made.append(flops) or real(*a, flops=flops))
    monkeypatch.setattr(costs, "_TRACES", {})
    two, four = dict(frames=2, height=64, width=64), dict(frames=4, height=64, width=64)
    program = costs.fake_trace(unet, unet_inputs.SVD, two, flops=False).program
    counted = costs.fake_trace(unet, unet_inputs.SVD, two)
    assert made == [False, True]  # the first had no FLOPs to give
    again = costs.fake_trace(unet, unet_inputs.SVD, two)
    assert costs.fake_trace(unet, unet_inputs.SVD, two, flops=False).program == program
    assert made == [False, True]
    assert again.program == counted.program == program and again.profiles == counted.profiles
    assert sum(p.flops for p in again.profiles) > 0
    longer = costs.fake_trace(unet, unet_inputs.SVD, four)
    assert made == [False, True, True]
    assert sum(p.flops for p in longer.profiles) > sum(p.flops for p in again.profiles)
    monkeypatch.setattr(costs, "_TRACES", {})  # forgotten: a fresh trace gives the same
    assert costs.fake_trace(unet, unet_inputs.SVD, four).profiles == longer.profiles and len(made) == 4
