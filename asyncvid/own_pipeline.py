"""AsyncDiff (Chen et al., NeurIPS 2024) on a pipeline the user built: one call on each rank of a torchrun or
accelerate job, every rank having built the same pipeline.

    pipe = AnimateDiffPipeline.from_pretrained(...).to(f"cuda:{local_rank}")
    handle = asyncvid.parallelize(pipe, asyncvid.AsyncDiffConfig(stages=2))
    frames = pipe(prompt, num_inference_steps=25, generator=torch.Generator().manual_seed(0)).frames
    handle.remove()  # the pipeline as it was

The split, the cost measurement, the agreement between ranks and the hook are those of `asyncvid generate`; only the
loading differs: the pipeline arrives whole, and the weights of the other stages are released afterwards.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist
from accelerate.utils import set_module_tensor_to_device
from diffusers.hooks import HookRegistry

from asyncvid.asyncdiff.config import AsyncDiffConfig, Layout
from asyncvid.asyncdiff.hook import HOOK_NAME, AsyncDiffHook, apply_asyncdiff, remove_asyncdiff
from asyncvid.asyncdiff.plan import Plan
from asyncvid.asyncdiff.setup import agreed_plan, stage_groups
from asyncvid.asyncdiff.weights import owned
from asyncvid.errors import UsageError
from asyncvid.pipelines import units_for
from asyncvid.runtime.launch import launched_externally

log = logging.getLogger("asyncvid")


@dataclass
class Parallelized:
    """AsyncDiff attached to `pipe` on this rank (stage `stage` of `plan`); `remove()` undoes it."""

    pipe: object
    plan: Plan
    stage: int
    hook: AsyncDiffHook
    # The other stages' tensors taken off this rank: name -> (device, a host copy), or (device, None) when the
    # pipeline was on the CPU and they were dropped.
    released: dict[str, tuple[torch.device, torch.Tensor | None]] = field(default_factory=dict)

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


def parallelize(pipe, config: AsyncDiffConfig | None = None, *, num_frames: int | None = None,
                height: int | None = None, width: int | None = None, keep_weights: bool = False,
                group=None) -> Parallelized:
    """Run `pipe`'s UNet as stage `rank` of `config.stages` (AsyncDiff) on this rank of `group` (default: the whole
    job); every rank calls this with the same pipeline and config, and then the pipeline as usual.

    The split is balanced for `num_frames` x `height` x `width` (default: the pipeline's defaults); any size may be
    asked for afterwards. Without `keep_weights` the weights of the other stages leave this rank's device: to host
    memory when the pipeline is on an accelerator (`remove()` brings them back), dropped when it is on the CPU.
    """
    config = config or AsyncDiffConfig()
    if not isinstance(config, AsyncDiffConfig):
        raise UsageError(f"parallelize takes an AsyncDiffConfig, got {type(config).__name__}")
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if not isinstance(unet, torch.nn.Module) or scheduler is None:
        raise UsageError(f"parallelize needs a diffusers pipeline with a unet and a scheduler, got "
                         f"{type(pipe).__name__}")
    if HookRegistry.check_if_exists_or_initialize(unet).get_hook(HOOK_NAME) is not None:
        raise UsageError("this pipeline's UNet is parallelized already; call remove() on its handle first")
    family = units_for(unet)  # an unsupported UNet fails here, on every rank, before any collective
    _join_process_group(unet)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device, dtype = unet.device, unet.dtype
    shape = {"frames": num_frames, "height": height, "width": width, "scale": getattr(pipe, "vae_scale_factor", 8)}
    settings = {"pipeline": type(pipe).__name__, "unet": dict(unet.config), "sampler": asdict(config),
                "shape": shape, "dtype": str(dtype)}
    _, plan = agreed_plan(unet, family, config, shape, settings, group, device, dtype)

    program = family.build_program(unet)
    stage_group, cfg = stage_groups(config, rank, world, group)
    stage = Layout(config.stages, config.stride).stage_of(rank % config.group_size)
    keep = list(program.shared) + [m for i in plan.units(stage) for m in program.units[i].owned]
    others = [m for i in range(len(plan.names)) if i not in plan.units(stage) for m in program.units[i].owned]
    released = {} if keep_weights else _release(unet, others, keep)
    hook = apply_asyncdiff(unet, program, plan, config, scheduler, stage_group, cfg)
    log.info("rank %d runs stage %d (%s .. %s)", rank, stage, plan.names[plan.units(stage)[0]],
             plan.names[plan.units(stage)[-1]])
    return Parallelized(pipe, plan, stage, hook, released)


def _join_process_group(unet) -> None:
    """Join the job's process group when a launcher set RANK and WORLD_SIZE but the script did not join it."""
    if dist.is_initialized():
        return
    if not launched_externally():
        raise UsageError("parallelize runs on every rank of a job: start the script with torchrun or accelerate "
                         "launch (or call torch.distributed.init_process_group first); in a notebook, use "
                         "asyncvid.load(build_fn, devices=N)")
    cuda = unet.device.type == "cuda"
    if cuda:
        torch.cuda.set_device(unet.device)
    dist.init_process_group("nccl" if cuda else "gloo", **({"device_id": unet.device} if cuda else {}))
    log.info("joined the process group as rank %s of %s", os.environ["RANK"], os.environ["WORLD_SIZE"])


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
