"""Setting up AsyncDiff on one rank: plan the split, load only this rank's share of the UNet, attach the hook."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.config import AsyncDiffConfig, Layout
from asyncvid.asyncdiff.costs import UnitProfile, fake_profile
from asyncvid.asyncdiff.hook import AsyncDiffHook, CfgSplit, apply_asyncdiff
from asyncvid.asyncdiff.plan import Plan, describe, make_plan, transfers
from asyncvid.asyncdiff.timing import measure_unit_costs
from asyncvid.asyncdiff.weights import load_owned, materialised_share, move_materialised
from asyncvid.errors import UsageError
from asyncvid.models.lora import fuse as fuse_loras
from asyncvid.models.schedulers import set_scheduler

log = logging.getLogger("asyncvid")


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
    """This rank's stage of the model in `folder`: the agreed split, only its weights loaded, the hook attached."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    unet = adapter.unet_skeleton(folder, motion_adapter)  # every form, a base model plus adapter too: no weights
    family = units_for(unet)
    profiles, plan = agreed_plan(unet, family, config, shape, settings, group, device, dtype)
    names = plan.names

    # 4. Materialise only this rank's stage plus the shared modules, then assemble the pipeline around it.
    program = family.build_program(unet)
    stage_group, cfg = stage_groups(config, rank, world, group)
    stage = Layout(config.stages, config.stride).stage_of(rank % config.group_size)
    keep = list(program.shared) + [m for i in plan.units(stage) for m in program.units[i].owned]
    load_owned(unet, adapter.unet_weights(folder, motion_adapter, variant), keep, device=device, dtype=dtype)
    pipe = adapter.load(folder, dtype=dtype, unet=unet, variant=variant)
    move_materialised(unet, device)  # what this rank holds of the UNet; Module.to would fail on the meta rest
    _move_except_unet(pipe, device)
    fuse_loras(pipe, loras)  # on the device, as a whole pipeline fuses: the others' LoRA layers stay on meta
    pipe.set_progress_bar_config(disable=True)
    set_scheduler(pipe, scheduler)  # before the hook, which reads the timesteps of pipe.scheduler
    share = materialised_share(unet)
    log.info("rank %d builds stage %d with %d units (%s .. %s), %.0f%% of the UNet's weights", rank, stage,
             len(plan.units(stage)), names[plan.units(stage)[0]], names[plan.units(stage)[-1]], 100 * share)

    # 5. The hook replaces the UNet's forward; the pipeline's own loop and scheduler do the rest.
    hook = apply_asyncdiff(unet, program, plan, config, pipe.scheduler, stage_group, cfg)
    return StagedPipeline(pipe, adapter, plan, hook, profiles, share)


def agreed_plan(unet, family, config: AsyncDiffConfig, shape: dict, settings: dict, group, device,
                dtype) -> tuple[list[UnitProfile], Plan]:
    """The split every rank of `group` runs: steps 1-2 touch no collective, so bad settings fail on every rank at
    once instead of hanging the others."""
    # 1. Validate locally: layout vs world size, then a plan from FLOPs (checks stages and a manual split).
    config.check_world_size(dist.get_world_size(group))
    profiles, plan = flops_plan(unet, family, config, shape)

    # 2. Agree: every rank must run the same model and settings.
    _check_agreement(settings, group)

    # 3. Costs: FLOPs, or unit times measured once on rank 0 with random weights (asyncvid.asyncdiff.timing: one
    # unit's at a time, never a copy of the model) and shared with all ranks.
    if config.cost == "measured" and config.stages > 1 and not config.split:
        # Over the whole world, not this group: data-parallel groups must split alike, or a video's bytes would
        # depend on which group made it. Every rank of every group loads here at once.
        costs = _measured_costs(unet, family, shape, device, dtype, dist.get_rank(), None, len(profiles))
        plan = make_plan(list(plan.names), costs, config.stages, config.split,
                         [float(p.param_bytes) for p in profiles], config.weight_cap)
    return profiles, plan


def flops_plan(unet, family, config: AsyncDiffConfig, shape: dict) -> tuple[list[UnitProfile], Plan]:
    """Each unit's profile at `shape` (fake tensors: no weights, no compute) and the split balanced on FLOPs; fails
    on a bad stage count or manual split before anything is loaded or exchanged."""
    example = functools.partial(family.example_inputs, **shape)
    profiles = fake_profile(lambda: type(unet).from_config(unet.config), family.build_program, example)
    plan = make_plan([p.name for p in profiles], [float(p.flops) for p in profiles], config.stages, config.split,
                     [float(p.param_bytes) for p in profiles], config.weight_cap)
    return profiles, plan


def stage_groups(config: AsyncDiffConfig, rank: int, world: int, group):
    """The group that runs this rank's copy of the staged UNet, and with --cfg-parallel the guidance split.

    Ranks [0, G) take the unconditional half of the guidance batch, ranks [G, 2G) the conditional half; rank r
    and r + G exchange their halves. Every rank creates every group, in the same order, as torch requires: with
    data-parallel groups (consecutive blocks of `world` ranks, asyncvid.runtime.layout) those of every block.
    """
    if not config.cfg_parallel:
        return group, None
    size = config.group_size
    mine = 0 if group is None else dist.get_global_rank(group, 0)
    for base in range(0, dist.get_world_size(), world):
        halves = [dist.new_group([base + r for r in range(i * size, (i + 1) * size)]) for i in range(2)]
        pairs = [dist.new_group([base + r, base + r + size]) for r in range(size)]
        if base == mine:
            chosen = halves[rank // size], CfgSplit(rank // size, pairs[rank % size])
    return chosen


def _check_agreement(settings: dict, group) -> None:
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, digest, group=group)
    differing = [r for r, d in enumerate(digests) if d != digests[0]]
    if differing:
        raise UsageError(
            f"ranks {differing} were started with a different model or settings than rank 0; launch every rank "
            f"with the same command"
        )


def _measured_costs(unet, family, shape, device, dtype, rank, group, units: int) -> list[float]:
    """Rank 0 measures (so every rank balances on the same numbers) and broadcasts."""
    costs = torch.zeros(units, dtype=torch.float64, device=device)
    if rank == 0:
        costs = torch.tensor(measure_unit_costs(unet, family, shape, device, dtype), dtype=torch.float64,
                             device=device)  # NCCL moves GPU tensors only
    dist.broadcast(costs, group=group, group_src=0)
    return costs.tolist()


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
    example = functools.partial(family.example_inputs, **shape)
    profiles = fake_profile(lambda: type(unet).from_config(unet.config), family.build_program, example)
    costs = [float(p.flops) for p in profiles]
    if config.cost == "measured":
        costs = measure_unit_costs(unet, family, shape, device, dtype)
    plan = make_plan([p.name for p in profiles], costs, config.stages, config.split,
                     [float(p.param_bytes) for p in profiles], config.weight_cap)
    header = f"{model}: {type(unet).__name__}, {len(profiles)} units, {config.stages} stages, balanced by {config.cost}"
    return header + "\n" + describe(plan, profiles, transfers(plan, family.build_program(unet)))
