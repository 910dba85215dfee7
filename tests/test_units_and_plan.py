"""Unit programs traced from the UNets' own forward: stages run through it equal the whole forward bit for bit, the
traced wiring is the UNet's skip structure, and plans balance, honour manual splits and move only consumed tensors."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.costs import fake_profile
from asyncvid.asyncdiff.plan import make_plan, transfers
from asyncvid.asyncdiff.stage import StageRunner
from asyncvid.asyncdiff.trace import trace
from asyncvid.errors import UsageError
from asyncvid.pipelines import unet_inputs
from asyncvid.pipelines.tiny_models import build_tiny_animatediff, build_tiny_svd

DATA = Path(__file__).parent / "data"
FAMILIES = {"svd": (build_tiny_svd, unet_inputs.SVD), "animatediff": (build_tiny_animatediff, unet_inputs.MOTION)}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    build, family = FAMILIES[request.param]
    unet = build().unet
    return unet, family, family.build_program(unet)


def staged_forward(unet, program, bounds, args, kwargs):
    """Each stage through the UNet's own forward, one after another, on what the stages before it produced."""
    runner = StageRunner(unet, program)
    stages = [range(a, b) for a, b in zip(bounds, bounds[1:])]
    try:
        inputs, out = {}, None
        for k, units in enumerate(stages):
            wanted = {key for later in stages[k + 1:] for key in program.needs_of(later, last=later == stages[-1])
                      if key[0] in units}
            out, produced = runner.run(unet.forward, units, dict(inputs), wanted, args, {**kwargs, "return_dict": False})
            inputs.update(produced)
        return out[0]
    finally:
        runner.remove()


@pytest.mark.parametrize("stages", [1, 2, 3, 5])
def test_stages_through_the_native_forward_equal_the_unet(tiny, stages):
    unet, family, program = tiny
    torch.manual_seed(0)
    args, kwargs = family.example_inputs(unet, frames=4, height=64, width=64)
    plan = make_plan(program.names, [1.0] * len(program.names), stages)
    with torch.inference_mode():
        expected = unet(*args, **kwargs, return_dict=False)[0]
        assert torch.equal(staged_forward(unet, program, plan.bounds, args, kwargs), expected)
        # and the hooks are gone: the UNet computes as before
        assert torch.equal(unet(*args, **kwargs, return_dict=False)[0], expected)


def test_traced_wiring_is_a_chain_with_skips_taken_last_in_first_out(tiny):
    """Every unit takes the one before it; the up path's resnets also take the down path's outputs in reverse."""
    _, _, program = tiny
    stack = []
    for i, unit in enumerate(program.units):
        chain = {(i - 1, 0)} if i else set()
        assert chain <= set(unit.needs), unit
        for key in sorted(set(unit.needs) - chain):
            assert stack.pop() == key, unit.name
        if unit.name.startswith("up_blocks") and ".resnets." in unit.name:
            assert len(unit.needs) == 2, unit
        if unit.name == "conv_in" or (unit.name.startswith("down_blocks") and
                                      (".downsamplers." in unit.name or _last_of_layer(program, i))):
            stack.append((i, 0))
    assert not stack and program.output_needs == ((len(program.units) - 1, 0),)


def _last_of_layer(program, i):
    """A down block's layer ends where the next unit starts another layer (a resnet) or a sampler or block."""
    name, after = program.units[i].name, program.units[i + 1].name
    block = name.split(".")[1]
    return ".resnets." in after or ".downsamplers." in after or after.split(".")[1] != block or not \
        after.startswith("down_blocks")


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
    costs = [p.flops for p in fake_profile(unet, family, dict(frames=4, height=64, width=64))]
    plan = make_plan(program.names, costs, stages)
    moves = transfers(plan, program)
    consumed = {(key, plan.stage_of(i)) for i, unit in enumerate(program.units) for key in unit.needs
                if plan.stage_of(key[0]) != plan.stage_of(i)}
    assert {(m.key, m.dst) for m in moves} == consumed
    assert all(m.src == plan.stage_of(m.key[0]) for m in moves)
    assert {m.dst for m in moves if m.key == (plan.bounds[m.dst] - 1, 0)} == set(range(1, stages))
    # Fewer tensors than every output produced before each boundary, which is what a broadcast of all would send.
    pushed = {key for unit in program.units for key in unit.needs}
    produced_before = sum(1 for k in range(1, stages) for key in pushed if key[0] < plan.bounds[k])
    assert len(moves) < produced_before


def _full_size_profiles(name):
    config = json.loads((DATA / name).read_text())
    cls, family, shape = {
        "svd_xt_unet.json": (UNetSpatioTemporalConditionModel, unet_inputs.SVD, dict(height=576, width=1024)),
        "animatediff_sd15_v152_unet.json": (UNetMotionModel, unet_inputs.MOTION, dict(height=512, width=512)),
    }[name]
    with torch.device("meta"):
        unet = cls.from_config(config)
    return fake_profile(unet, family, shape)


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


def test_a_call_wired_unlike_the_plan_is_refused_in_one_line(tiny):
    """The runtime trace of each call signature is checked against the planned program before any unit runs."""
    unet, family, program = tiny
    skewed = dataclasses.replace(program, units=(*program.units[:-1],
                                                 dataclasses.replace(program.units[-1], needs=((0, 0),))))
    args, kwargs = family.example_inputs(unet, frames=2, height=64, width=64)
    runner = StageRunner(unet, skewed)
    try:
        with pytest.raises(UsageError, match="connects its units differently than the split was planned for"):
            runner.run(unet.forward, range(len(program.units)), {}, set(), args, kwargs)
    finally:
        runner.remove()


def test_a_sample_the_unet_cannot_take_is_refused_by_the_trace(tiny):
    """What fails in the UNet's own forward fails on shapes alone, before anything is loaded or exchanged."""
    unet, family, _ = tiny
    frames = 40 if family is unet_inputs.MOTION else 4  # past the motion modules' 32 positions
    channels = unet.config.in_channels + (1 if family is unet_inputs.SVD else 0)  # SVD: a wrong channel count
    with torch.device("meta"):
        args, kwargs = family.example_inputs(unet, frames=frames, height=64, width=64)
    sample = args[0]
    sample = sample.new_empty((*sample.shape[:2], channels, *sample.shape[3:])) if family is unet_inputs.SVD else sample
    with pytest.raises(UsageError, match=f"{type(unet).__name__} cannot take a sample of shape"):
        trace(unet, (sample, *args[1:]), kwargs)
