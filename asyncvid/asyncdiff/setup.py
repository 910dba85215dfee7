"""Setting up AsyncDiff on one rank: plan the split, load only this rank's share of the UNet, attach the hook."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.agree import agreed_plan, flops_plan
from asyncvid.asyncdiff.attach import attach, stage_modules
from asyncvid.asyncdiff.config import AsyncDiffConfig, Layout
from asyncvid.asyncdiff.costs import UnitProfile, fake_trace
from asyncvid.asyncdiff.hook import AsyncDiffHook
from asyncvid.asyncdiff.plan import Plan, describe, make_plan, transfers
from asyncvid.asyncdiff.timing import measure_unit_costs
from asyncvid.asyncdiff.weights import load_owned, move_materialised
from asyncvid.models.lora import fuse as fuse_loras
from asyncvid.models.schedulers import set_scheduler

__all__ = ["StagedPipeline", "describe_split", "flops_plan", "setup_asyncdiff"]

@dataclass
class StagedPipeline:
    """A pipeline whose UNet runs one stage on this rank."""

    pipe: object
    adapter: object
    plan: Plan
    hook: AsyncDiffHook
    profiles: list[UnitProfile]
    weight_share: float  # of the UNet's parameters materialised on this rank


def setup_asyncdiff(folder, adapter, units_for, config: AsyncDiffConfig, *, shape: dict, device, dtype,
                    motion_adapter=None, settings: dict, group=None, scheduler: str | None = None,
                    variant: str | None = None, loras: tuple = ()) -> StagedPipeline:
    """This rank's stage of the model in `folder`: the agreed split, only its weights loaded, then the one call a
    user's pipeline gets (`asyncvid.parallelize`'s `attach`) on that split."""
    rank = dist.get_rank(group)
    unet = adapter.unet_skeleton(folder, motion_adapter)  # every form, a base model plus adapter too: no weights
    family = units_for(unet)
    traced = fake_trace(unet, family, shape)  # the program and the units' FLOPs: one trace, seconds on a real UNet
    profiles, plan = agreed_plan(unet, family, config, shape, settings, group, device, dtype, traced.profiles)

    # 4. Materialise only this rank's stage plus the shared modules, then assemble the pipeline around it.
    stage = Layout(config.stages, config.stride).stage_of(rank % config.group_size)
    program = traced.program
    load_owned(unet, adapter.unet_weights(folder, motion_adapter, variant), stage_modules(program, plan, stage),
               device=device, dtype=dtype)
    pipe = adapter.load(folder, dtype=dtype, unet=unet, variant=variant)
    move_materialised(unet, device)  # what this rank holds of the UNet; Module.to would fail on the meta rest
    _move_except_unet(pipe, device)
    fuse_loras(pipe, loras)  # on the device, as a whole pipeline fuses: the others' LoRA layers stay on meta
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)  # before the hook, which reads the timesteps of pipe.scheduler

    # 5. The hook, as asyncvid.parallelize attaches it; the other stages' weights were never loaded.
    attached = attach(pipe, family, config, shape=shape, group=group, keep_weights=True, plan=plan,
                      program=program)
    return StagedPipeline(pipe, adapter, plan, attached.hook, profiles, attached.weight_share)


def _move_except_unet(pipe, device) -> None:
    """`pipe.to` would try to copy the UNet's meta (not materialised) weights."""
    for name, component in pipe.components.items():
        if name != "unet" and isinstance(component, torch.nn.Module):
            component.to(device)


def describe_split(model: str, folder, adapter, units_for, config: AsyncDiffConfig, *, motion_adapter=None,
                   shape: dict, device, dtype) -> str:
    """The printable plan of the UNet in `folder` split as `config` asks (what `asyncvid plan` shows)."""
    unet = adapter.unet_skeleton(folder, motion_adapter)
    family = units_for(unet)
    traced = fake_trace(unet, family, shape)
    profiles = traced.profiles
    costs = [float(p.flops) for p in profiles]
    if config.cost == "measured":
        costs = measure_unit_costs(unet, family, shape, device, dtype)
    plan = make_plan([p.name for p in profiles], costs, config.stages, config.split,
                     [float(p.param_bytes) for p in profiles], config.weight_cap)
    header = f"{model}: {type(unet).__name__}, {len(profiles)} units, {config.stages} stages, balanced by {config.cost}"
    return header + "\n" + describe(plan, profiles, transfers(plan, traced.program))
