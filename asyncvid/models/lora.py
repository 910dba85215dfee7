"""LoRAs (`--lora PATH[:scale]`) fused into a pipeline's weights as diffusers fuses them: load_lora_weights,
fuse_lora at the scale, unload. On a rank that holds part of the UNet the other stages' modules are on the meta
device, and their LoRA layers stay there, so each rank fuses exactly its own share, bit for bit as a whole pipeline
would (tests/test_lora.py)."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from asyncvid.errors import UsageError

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes in a folder


@dataclass(frozen=True)
class Lora:
    """A LoRA file (or a folder holding diffusers' pytorch_lora_weights.safetensors) and the scale it is fused at."""

    path: str
    scale: float = 1.0

    def describe(self) -> list:
        return [self.path, self.scale]


def parse(spec: str) -> Lora:
    """`PATH` or `PATH:SCALE`, checked without loading anything."""
    path, scale = spec, 1.0
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            path, scale = head, float(tail)
        except ValueError:
            pass  # a colon inside the path
    if not math.isfinite(scale):
        raise UsageError(f"LoRA scale in '{spec}' must be a finite number, e.g. --lora {path}:0.8")
    weights = weights_file(Path(path).expanduser())
    return Lora(str(weights), scale)


def weights_file(path: Path) -> Path:
    """The safetensors file of a LoRA given as a file or a folder."""
    if path.is_dir():
        inside = path / WEIGHT_NAME
        if inside.is_file():
            return inside.resolve()
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0].resolve()
        raise UsageError(f"LoRA folder '{path}' holds {len(found)} .safetensors files and no {WEIGHT_NAME}; pass "
                         f"the file itself, e.g. --lora {found[0] if found else path / 'my_lora.safetensors'}")
    if not path.is_file():
        raise UsageError(f"LoRA '{path}' does not exist; pass a .safetensors file or a folder saved by diffusers")
    if path.suffix != ".safetensors":
        raise UsageError(f"LoRA '{path}' is not a .safetensors file; asyncvid loads LoRAs from safetensors only "
                         f"(a pickle can run code), so convert it first")
    return path.resolve()


def fuse(pipe, loras: tuple[Lora, ...]) -> None:
    """Fuse each LoRA into `pipe`'s weights at its scale, in the order given (every rank in the same order)."""
    if loras and not hasattr(pipe, "load_lora_weights"):
        raise UsageError(f"{type(pipe).__name__} does not load LoRAs; drop --lora")
    for i, lora in enumerate(loras):
        path, name = Path(lora.path), f"asyncvid_lora_{i}"
        try:
            with quiet_peft_errors():
                pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name=name)
        except (ValueError, RuntimeError, KeyError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"LoRA '{lora.path}' does not fit this model ({reason[:200]}); pass a LoRA trained "
                             f"for this base model") from err
        pipe.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
        pipe.unload_lora_weights()


@contextlib.contextmanager
def quiet_peft_errors():
    """diffusers logs a LoRA that does not fit (every mismatched layer, hundreds of lines) before raising; the
    raised error is reported instead, in one line."""
    logger = logging.getLogger("diffusers.loaders.peft")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)
