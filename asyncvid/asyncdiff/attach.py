"""AsyncDiff (Chen et al., NeurIPS 2024) on a pipeline already in memory: the agreed split, the other stages' weights
taken off this rank, the stage hook; `Attached.remove()` undoes all three."""

from __future__ import annotations

import logging
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from accelerate.utils import set_module_tensor_to_device
from diffusers.hooks import HookRegistry

from asyncvid.asyncdiff.agree import agreed_plan, stage_groups
from asyncvid.asyncdiff.config import AsyncDiffConfig, Layout
from asyncvid.asyncdiff.costs import fake_trace, public_config
from asyncvid.asyncdiff.hook import HOOK_NAME, AsyncDiffHook, apply_asyncdiff, remove_asyncdiff
from asyncvid.asyncdiff.plan import Plan
from asyncvid.asyncdiff.units import Program
from asyncvid.asyncdiff.weights import materialised_share, owned
from asyncvid.errors import UsageError

log = logging.getLogger("asyncvid")


@dataclass
class Attached:
    """AsyncDiff attached to `pipe` on this rank (stage `stage` of `plan`); `remove()` undoes it."""

    pipe: object
    plan: Plan
    stage: int
    hook: AsyncDiffHook
    # The other stages' tensors taken off this rank: name -> (device, a host copy), or (device, None) when the
    # pipeline was on the CPU and they were dropped.
    released: dict[str, tuple[torch.device, torch.Tensor | None]] = field(default_factory=dict)

    @property
    def weight_share(self) -> float:
        """The fraction of the UNet's parameters this rank holds."""
        return materialised_share(self.pipe.unet)

    def remove(self) -> None:
        """Detach the hook and put back the released weights: the pipeline computes bit for bit as before, unless
        they were dropped (a CPU pipeline without keep_weights), which a warning says."""
        unet = self.pipe.unet
        if HookRegistry.check_if_exists_or_initialize(unet).get_hook(HOOK_NAME) is not self.hook:
            return  # removed before
        remove_asyncdiff(unet)
        for name, (device, value) in self.released.items():
            if value is not None:
                set_module_tensor_to_device(unet, name, device, value=value)
        dropped = [name for name, (_, value) in self.released.items() if value is None]
        if dropped:
            warnings.warn(f"the UNet lacks the weights of the other stages ({dropped[0]} and {len(dropped) - 1} "
                          f"more), dropped to save memory on the CPU; reload the pipeline, or pass "
                          f"keep_weights=True to parallelize", stacklevel=2)
        self.released = {}


def attach(pipe, family, config: AsyncDiffConfig, *, shape: dict, group=None, keep_weights: bool = False,
           settings: dict | None = None, plan: Plan | None = None, program: Program | None = None) -> Attached:
    """Run `pipe`'s UNet (traced as `family`'s pipelines call it) as this rank's stage; every rank of `group` calls this
    with the same pipeline. Without `keep_weights` the other stages' weights leave the device: to host memory from
    an accelerator, dropped (meta) on the CPU. A `plan` agreed before and the `program` traced before (asyncdiff.setup,
    which loads only the stage's weights) are taken as they are: a trace costs seconds per rank on a real UNet."""
    unet = pipe.unet
    if HookRegistry.check_if_exists_or_initialize(unet).get_hook(HOOK_NAME) is not None:
        raise UsageError("this pipeline's UNet is parallelized already; call remove() on its handle first")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device, dtype = unet.device, unet.dtype
    settings = {**(settings or {}), "pipeline": type(pipe).__name__, "unet": public_config(unet.config),
                "sampler": asdict(config), "shape": shape, "dtype": str(dtype)}
    if plan is None:
        traced = fake_trace(unet, family, shape)  # the program and the units' FLOPs: one trace, seconds on a real UNet
        program = traced.program
        _, plan = agreed_plan(unet, family, config, shape, settings, group, device, dtype, traced.profiles)
    program = program or family.build_program(unet)

    stage_group, cfg = stage_groups(config, rank, world, group)
    stage = Layout(config.stages, config.stride).stage_of(rank % config.group_size)
    keep = stage_modules(program, plan, stage)
    others = [m for i in range(len(plan.names)) if i not in plan.units(stage) for m in program.units[i].owned]
    released = {} if keep_weights else _release(unet, others, keep)
    hook = apply_asyncdiff(unet, program, plan, config, SchedulerOf(pipe), stage_group, cfg)
    attached = Attached(pipe, plan, stage, hook, released)
    log.info("rank %d runs stage %d with %d units (%s .. %s), %.0f%% of the UNet's weights", rank, stage,
             len(plan.units(stage)), plan.names[plan.units(stage)[0]], plan.names[plan.units(stage)[-1]],
             100 * attached.weight_share)
    return attached


def stage_modules(program, plan: Plan, stage: int) -> list[str]:
    """The modules a rank running `stage` holds: the shared ones and its units'."""
    return list(program.shared) + [m for i in plan.units(stage) for m in program.units[i].owned]


class SchedulerOf:
    """The timesteps of the scheduler `pipe` has when the hook reads them: a user may set pipe.scheduler later."""

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def timesteps(self):
        return self.pipe.scheduler.timesteps


def _release(unet, modules: list[str], keep: list[str]) -> dict[str, tuple[torch.device, torch.Tensor | None]]:
    """Take the tensors under `modules` (but not under `keep`) off their device: to host memory from an accelerator,
    to nothing (meta) on the CPU."""
    released = {}
    for name, tensor in [*unet.named_parameters(), *unet.named_buffers()]:
        if tensor.is_meta or not owned(name, modules) or owned(name, keep):
            continue
        released[name] = (tensor.device, None if tensor.device.type == "cpu" else tensor.detach().to("cpu"))
        set_module_tensor_to_device(unet, name, "meta")
    return released
