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

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.attach import Attached, attach
from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.errors import UsageError
from asyncvid.pipelines import units_for
from asyncvid.runtime.launch import launched_externally

log = logging.getLogger("asyncvid")
Parallelized = Attached  # the handle parallelize returns: .plan, .stage, .weight_share, .remove()


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
    family = units_for(unet)  # an unsupported UNet fails here, on every rank, before any collective
    _join_process_group(unet)
    shape = {"frames": num_frames, "height": height, "width": width, "scale": getattr(pipe, "vae_scale_factor", 8)}
    return attach(pipe, family, config, shape=shape, group=group, keep_weights=keep_weights)


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
