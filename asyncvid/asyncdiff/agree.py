"""The split every rank agrees on before anything is loaded or exchanged: validated locally, the same model and
settings checked on every rank, costs measured once and shared; and the process groups of a rank layout."""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.costs import UnitProfile, fake_profile
from asyncvid.asyncdiff.hook import CfgSplit
from asyncvid.asyncdiff.plan import Plan, make_plan
from asyncvid.asyncdiff.timing import measure_unit_costs
from asyncvid.errors import UsageError


def agreed_plan(unet, family, config: AsyncDiffConfig, shape: dict, settings: dict, group, device, dtype,
                profiles: list[UnitProfile] | None = None) -> tuple[list[UnitProfile], Plan]:
    """The split every rank of `group` runs (`profiles`: the units' at `shape`, where the caller traced them): steps
    1-2 touch no collective, so bad settings fail on every rank at once instead of hanging the others."""
    # 1. Validate locally: layout vs world size, then a plan from FLOPs (checks stages and a manual split).
    config.check_world_size(dist.get_world_size(group))
    profiles, plan = flops_plan(unet, family, config, shape, profiles)

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


def flops_plan(unet, family, config: AsyncDiffConfig, shape: dict,
               profiles: list[UnitProfile] | None = None) -> tuple[list[UnitProfile], Plan]:
    """Each unit's profile at `shape` (fake tensors: no weights, no compute; traced here unless given) and the split
    balanced on FLOPs; fails on a bad stage count or manual split before anything is loaded or exchanged."""
    profiles = fake_profile(unet, family, shape) if profiles is None else profiles
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
