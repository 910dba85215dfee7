"""Unit programs mirror the UNets exactly; plans balance, honour manual splits and move only consumed tensors."""

import functools
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.costs import fake_profile, profile
from asyncvid.asyncdiff.plan import HIDDEN, make_plan, transfers
from asyncvid.asyncdiff.units import run_program, skip_wiring
from asyncvid.errors import UsageError
from asyncvid.pipelines import motion_units, svd_units
from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd

DATA = Path(__file__).parent / "data"
FAMILIES = {"svd": (build_tiny_svd, svd_units), "animatediff": (build_tiny_animatediff, motion_units)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    build, family = FAMILIES[request.param]
    unet = build().unet
    return unet, family, family.build_program(unet)


def test_unit_program_equals_unet_forward(tiny):
    unet, family, program = tiny
    torch.manual_seed(0)
    args, kwargs = family.example_inputs(unet, frames=4, height=64, width=64)
    with torch.inference_mode():
        expected = unet(*args, **kwargs, return_dict=False)[0]
        assert torch.equal(run_program(program, *args, **kwargs), expected)


def test_every_module_with_weights_belongs_to_one_unit_or_the_shared_set(tiny):
    unet, family, program = tiny
    units = [m for unit in program.units for m in unit.owned]
    assert len(units) == len(set(units))
    owners = units + list(program.shared)
    for name, _ in unet.named_parameters():
        assert any(name.startswith(m + ".") for m in owners), name


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_transfers_carry_exactly_what_later_stages_consume(tiny, stages):
    unet, family, program = tiny
    args, kwargs = family.example_inputs(unet, frames=4, height=64, width=64)
    costs = [p.flops for p in profile(program, unet, args, kwargs)]
    plan = make_plan(program.names, costs, stages)
    pops, _ = skip_wiring(program.units)
    moves = transfers(plan, program)
    consumed = {(producer, plan.stage_of(i)) for i, producer in enumerate(pops)
                if producer is not None and plan.stage_of(producer) != plan.stage_of(i)}
    assert {(m.key, m.dst) for m in moves if m.key != HIDDEN} == consumed
    assert all(m.src == plan.stage_of(m.key) for m in moves if m.key != HIDDEN)
    assert sorted(m.dst for m in moves if m.key == HIDDEN) == list(range(1, stages))
    # Fewer tensors than every skip produced before each boundary, which is what a broadcast of all would send.
    produced_before = sum(1 for k in range(1, stages) for i, p in enumerate(pops) if p is not None and p < plan.bounds[k])
    assert len(moves) < produced_before + stages - 1


def _full_size_profiles(name):
    config = json.loads((DATA / name).read_text())
    cls, family, shape = {
        "svd_xt_unet.json": (UNetSpatioTemporalConditionModel, svd_units, dict(height=576, width=1024)),
        "animatediff_sd15_v152_unet.json": (UNetMotionModel, motion_units, dict(height=512, width=512)),
    }[name]
    example = functools.partial(family.example_inputs, **shape)
    return fake_profile(lambda: cls.from_config(config), family.build_program, example)


@pytest.fixture(scope="module", params=["svd_xt_unet.json", "animatediff_sd15_v152_unet.json"])
def full_size(request):
    return _full_size_profiles(request.param)


@pytest.mark.parametrize("stages", [2, 3, 4])
def test_full_size_plans_are_balanced(full_size, stages):
    names, costs = [p.name for p in full_size], [float(p.flops) for p in full_size]
    plan = make_plan(names, costs, stages, weights=[p.param_bytes for p in full_size])
    stage_costs = plan.stage_costs()
    assert max(stage_costs) <= 1.25 * sum(stage_costs) / stages


def test_weight_cap_bounds_each_stage(full_size):
    names, costs = [p.name for p in full_size], [float(p.flops) for p in full_size]
    weights = [p.param_bytes for p in full_size]
    plan = make_plan(names, costs, 2, weights=weights, weight_cap=0.6)
    for k in range(2):
        assert sum(weights[i] for i in plan.units(k)) <= 0.6 * sum(weights)
    uncapped = make_plan(names, costs, 2, weights=weights)
    assert max(sum(weights[i] for i in uncapped.units(k)) for k in range(2)) > 0.6 * sum(weights)


def test_manual_split_is_followed_and_checked(tiny):
    _, _, program = tiny
    names = program.names
    costs = [1.0] * len(names)
    plan = make_plan(names, costs, 3, split=[names[5], names[20]])
    assert plan.bounds == (0, 5, 20, len(names))
    with pytest.raises(UsageError, match="did you mean 'conv_out'"):
        make_plan(names, costs, 2, split=["conv_outt"])
    with pytest.raises(UsageError, match="names 2 units"):
        make_plan(names, costs, 3, split=[names[5]])
    with pytest.raises(UsageError, match="forward order"):
        make_plan(names, costs, 3, split=[names[20], names[5]])
    with pytest.raises(UsageError, match=f"between 1 and {len(names)}"):
        make_plan(names, costs, len(names) + 1)


def test_config_checks_world_size_and_values():
    with pytest.raises(UsageError, match=r"2 \+ 2 - 1 = 3 processes, but 2"):
        AsyncDiffConfig(stages=2, stride=2).check_world_size(2)
    for bad in (dict(stages=0), dict(stride=0), dict(warmup=0), dict(cost="guess"), dict(weight_cap=0),
                dict(stale="guess"), dict(refresh=-1)):
        with pytest.raises(UsageError, match=str(list(bad.values())[0])):
            AsyncDiffConfig(**bad)
    with pytest.raises(UsageError, match="refresh works with stride 1 only, got stride 2"):
        AsyncDiffConfig(stride=2, refresh=4)


def test_refresh_steps_are_synchronous():
    config = AsyncDiffConfig(warmup=2, refresh=3)
    assert [s for s in range(12) if config.synchronous(s)] == [0, 1, 4, 7, 10]
    assert [s for s in range(5) if AsyncDiffConfig(warmup=2).synchronous(s)] == [0, 1]
