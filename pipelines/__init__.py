"""Model adapters, chosen by pipeline class: how to load each family, check a request before loading, and call it."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import torch
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

from asyncvid.errors import UsageError
from asyncvid.models import sampling_defaults
from asyncvid.models.schedulers import check_scheduler
from asyncvid.models.sources import check_components, check_weights, resolve_folder
from asyncvid.pipelines import animatediff, motion_units, svd, svd_units
from asyncvid.pipelines.embedded import EMBEDDED, materialize

# model_index.json `_class_name` -> adapter. A Stable Diffusion folder is an AnimateDiff base model.
ADAPTERS: dict[str, ModuleType] = {
    "AnimateDiffPipeline": animatediff,
    "StableDiffusionPipeline": animatediff,
    "StableVideoDiffusionPipeline": svd,
}


# UNet class -> its unit program (how stage-parallel samplers split it).
UNIT_PROGRAMS: dict[type, ModuleType] = {
    UNetSpatioTemporalConditionModel: svd_units,
    UNetMotionModel: motion_units,
}


def units_for(unet) -> ModuleType:
    """The unit-program module for a UNet, by class."""
    for cls, module in UNIT_PROGRAMS.items():
        if isinstance(unet, cls):
            return module
    raise UsageError(f"{type(unet).__name__} cannot be split into stages; supported: "
                     f"{', '.join(c.__name__ for c in UNIT_PROGRAMS)}")


def adapter_for(folder: Path) -> ModuleType:
    """The adapter for a diffusers folder, by the pipeline class it was saved from."""
    class_name = json.loads((folder / "model_index.json").read_text()).get("_class_name")
    if class_name not in ADAPTERS:
        raise UsageError(f"model '{folder}' is a {class_name}; asyncvid supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[class_name]


def resolve_model(spec: str, *, allow_pickle: bool = False) -> Path:
    """An embedded name, a local folder or a cached hub id, as a local diffusers pipeline folder."""
    folder = resolve_folder(spec, EMBEDDED, materialize)
    check_components(folder, allow_pickle=allow_pickle)
    return folder


def resolve_motion_adapter(spec: str) -> Path:
    """A motion adapter folder (config.json + weights), local or from the HF cache."""
    return resolve_folder(spec, (), materialize, marker="config.json")


def load_pipeline(model: str, *, device: torch.device, dtype: torch.dtype, motion_adapter: str | None = None,
                  allow_pickle: bool = False):
    """Load a pipeline onto `device` in `dtype`; returns (pipeline, adapter, folder). Safetensors only unless
    `allow_pickle` (a pickle can run code when loaded)."""
    folder = resolve_model(model, allow_pickle=allow_pickle)
    adapter = adapter_for(folder)
    adapter_folder = resolve_motion_adapter(motion_adapter) if motion_adapter else None
    pipe = adapter.load(folder, dtype=dtype, motion_adapter=adapter_folder, allow_pickle=allow_pickle)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter, folder


def preflight(model: str, task: str | None, requests: list, *, motion_adapter: str | None = None,
              allow_pickle: bool = False, scheduler: str | None = None) -> Path:
    """Every check on the model that needs no weights, run once before any worker starts, so that a bad model fails
    in one line from one process: its source, components and weights, its task (unless None: any), and each request
    (frames, and a warning for a prompt longer than the text encoder reads), and a replacement scheduler."""
    folder = resolve_folder(model, EMBEDDED, materialize)
    check_components(folder, allow_pickle=allow_pickle)
    adapter = adapter_for(folder)
    if task is not None and adapter.TASK != task:
        command = "generate" if adapter.TASK == "text-to-video" else "i2v"
        raise UsageError(f"model '{model}' does {adapter.TASK}, not {task}; use `asyncvid {command}` with it")
    motion = None
    if motion_adapter is not None:
        motion = resolve_folder(motion_adapter, (), materialize, marker="config.json")
        check_weights(motion, allow_pickle=allow_pickle)
    adapter.check_folder(folder, requests, motion_adapter=motion)
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler is not None and scheduler_config.is_file():
        check_scheduler(scheduler, json.loads(scheduler_config.read_text()))
    return folder


def recommended_guidance(model: str) -> float:
    """The guidance scale `model` is sampled with when the user gives none: its folder's sampling.json, else 7.5."""
    return sampling_defaults.guidance(resolve_folder(model, EMBEDDED, materialize))
