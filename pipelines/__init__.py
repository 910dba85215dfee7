"""Model adapters, chosen by pipeline class: how to load each family, check a request before loading, and call it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import ModuleType

import torch
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

from asyncvid.asyncdiff.family import Family
from asyncvid.errors import UsageError
from asyncvid.models import sampling_defaults
from asyncvid.models.lora import quiet_peft_errors
from asyncvid.models.schedulers import check_scheduler
from asyncvid.models.sources import (
    adapter_variant,
    check_components,
    check_weights,
    components,
    pipeline_class,
    resolve_folder,
)
from asyncvid.models.variants import forms
from asyncvid.pipelines import animatediff, svd, unet_inputs
from asyncvid.pipelines.embedded import EMBEDDED, materialize
from asyncvid.requests import UsageWarning

# model_index.json `_class_name` -> adapter. A Stable Diffusion folder is an AnimateDiff base model.
ADAPTERS: dict[str, ModuleType] = {
    "AnimateDiffPipeline": animatediff,
    "StableDiffusionPipeline": animatediff,
    "StableVideoDiffusionPipeline": svd,
}


# UNet class -> how its pipelines call it (what stage-parallel samplers trace and plan the UNet on).
FAMILIES: dict[type, Family] = {
    UNetSpatioTemporalConditionModel: unet_inputs.SVD,
    UNetMotionModel: unet_inputs.MOTION,
}


def units_for(unet) -> Family:
    """The family of a UNet, by class."""
    for cls, family in FAMILIES.items():
        if isinstance(unet, cls):
            return family
    raise UsageError(f"{type(unet).__name__} cannot be split into stages; supported: "
                     f"{', '.join(c.__name__ for c in FAMILIES)}")


def adapter_for(folder: Path) -> ModuleType:
    """The adapter for a diffusers folder, by the pipeline class it was saved from."""
    class_name = pipeline_class(folder)
    if class_name not in ADAPTERS:
        raise UsageError(f"model '{folder}' is a {class_name}; asyncvid supports {', '.join(sorted(ADAPTERS))}")
    return ADAPTERS[class_name]


def adapter_of(pipe) -> ModuleType:
    """The adapter for a pipeline object a user built, by its exact class (a subclass, e.g. AnimateDiff with
    ControlNet, calls the UNet with more than the adapter passes)."""
    for adapter in (animatediff, svd):
        if type(pipe) is adapter.PIPELINE:
            return adapter
    raise UsageError(f"build_fn returned a {type(pipe).__name__}; asyncvid.load samples AnimateDiffPipeline and "
                     f"StableVideoDiffusionPipeline (for others, call asyncvid.parallelize under torchrun)")


def latent_shape(folder: Path, frames: int | None, height: int | None, width: int | None) -> dict:
    """The sizes a split is planned at (the families' `example_inputs`), with the factor the folder's VAE shrinks
    frames by: 2 ** (its blocks - 1), as the pipelines compute `vae_scale_factor` (8 for SD's 4-block VAE)."""
    vae = folder / "vae" / "config.json"
    blocks = len(json.loads(vae.read_text()).get("block_out_channels", [0] * 4)) if vae.is_file() else 4
    return {"frames": frames, "height": height, "width": width, "scale": 2 ** (blocks - 1)}


def resolve_model(spec: str, *, allow_pickle: bool = False, variant: str | None = None) -> Path:
    """An embedded name, a local folder or a cached hub id, as a local diffusers pipeline folder."""
    folder = resolve_folder(spec, EMBEDDED, materialize)
    check_components(folder, loads=adapter_for(folder).COMPONENTS, allow_pickle=allow_pickle, variant=variant)
    return folder


def resolve_motion_adapter(spec: str) -> Path:
    """A motion adapter folder (config.json + weights), local or from the HF cache."""
    return resolve_folder(spec, (), materialize, marker="config.json")


def load_pipeline(model: str, *, device: torch.device, dtype: torch.dtype, motion_adapter: str | None = None,
                  allow_pickle: bool = False, variant: str | None = None):
    """Load a pipeline onto `device` in `dtype`; returns (pipeline, adapter, folder). Safetensors only unless
    `allow_pickle` (a pickle can run code when loaded); `variant` chooses a form of the weights (e.g. fp16)."""
    folder = resolve_model(model, allow_pickle=allow_pickle, variant=variant)
    adapter = adapter_for(folder)
    adapter_folder = resolve_motion_adapter(motion_adapter) if motion_adapter else None
    pipe = adapter.load(folder, dtype=dtype, motion_adapter=adapter_folder, allow_pickle=allow_pickle,
                        variant=variant)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, adapter, folder


def preflight(model: str, task: str | None, requests: list, *, motion_adapter: str | None = None,
              allow_pickle: bool = False, scheduler: str | None = None, variant: str | None = None,
              loras: tuple = ()) -> Path:
    """Every check on the model that needs no weights, run once before any worker starts, so that a bad model fails
    in one line from one process: its source, components, weights and their form (variant), its task (unless None:
    any), and each request (frames, and a warning for a prompt longer than the text encoder reads), and a replacement
    scheduler. What it decides for the user (a variant, a component left out) it says here, once."""
    folder = resolve_folder(model, EMBEDDED, materialize)
    adapter = adapter_for(folder)
    choice = check_components(folder, loads=adapter.COMPONENTS, allow_pickle=allow_pickle, variant=variant,
                              name=model)
    if task is not None and adapter.TASK != task:
        command = "generate" if adapter.TASK == "text-to-video" else "i2v"
        raise UsageError(f"model '{model}' does {adapter.TASK}, not {task}; use `asyncvid {command}` with it")
    notes = [choice.note]
    index = json.loads((folder / "model_index.json").read_text())
    for name in components(index):
        if name not in adapter.COMPONENTS:
            notes.append(f"'{model}' has a {name} ({index[name][1]}), which {adapter.PIPELINE.__name__} does not "
                         f"take: it is not loaded")
    motion = None
    if motion_adapter is not None:
        motion = resolve_folder(motion_adapter, (), materialize, marker="config.json")
        chosen = adapter_variant(motion, variant, name=motion_adapter) if forms(motion) else None
        check_weights(motion, allow_pickle=allow_pickle, variant=chosen and chosen.variant)
        notes.append(chosen and chosen.note)
    adapter.check_folder(folder, requests, motion_adapter=motion)
    if loras:
        check_loras(adapter, adapter.unet_skeleton(folder, motion), loras)
    scheduler_config = folder / "scheduler" / "scheduler_config.json"
    if scheduler is not None and scheduler_config.is_file():
        check_scheduler(scheduler, json.loads(scheduler_config.read_text()))
    for note in filter(None, notes):
        warnings.warn(UsageWarning(note), stacklevel=2)
    return folder


def check_loras(adapter, skeleton, loras: tuple) -> None:
    """Each LoRA loads into the UNet's empty skeleton (no weights, no compute): one that does not fit this model fails
    here, once, rather than on every rank after the model loaded, and layers that match no module are said. Its
    text-encoder part is checked at load."""
    pipeline = adapter.PIPELINE
    if not hasattr(pipeline, "load_lora_into_unet"):
        raise UsageError(f"{pipeline.__name__} does not load LoRAs; drop --lora")
    for i, lora in enumerate(loras):
        path = Path(lora.path)
        state, alphas = pipeline.lora_state_dict(path.parent, weight_name=path.name)
        wanted = sum(key.startswith("unet.") and ".lora_A." in key for key in state)
        if not wanted:
            continue  # a text-encoder-only LoRA
        name = f"check_{i}"
        try:
            with warnings.catch_warnings(), quiet_peft_errors():
                warnings.simplefilter("ignore")  # loading into meta tensors is a no-op, as intended here
                pipeline.load_lora_into_unet(state, alphas, unet=skeleton, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
            reason = next((line for line in lines if "mismatch" in line), lines[0])
            raise UsageError(f"LoRA '{lora.path}' does not fit this model's UNet ({reason[:240]}); pass a LoRA "
                             f"trained for this base model") from err
        found = sum(f".lora_A.{name}." in key for key, _ in skeleton.named_parameters())
        if found < wanted:
            warnings.warn(UsageWarning(f"LoRA '{lora.path}': {wanted - found} of its {wanted} UNet layers match no "
                                       f"module of this model and are not applied"), stacklevel=2)


def recommended_sampling(model: str) -> sampling_defaults.Recommended:
    """What `model` is sampled with where the user sets nothing: its folder's sampling.json, else diffusers' defaults
    (guidance 7.5, independent noise per frame)."""
    return sampling_defaults.recommended(resolve_folder(model, EMBEDDED, materialize))
