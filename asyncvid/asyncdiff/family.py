"""How a pipeline family calls its UNet: the frame axis of the sample and example inputs, from which the unit program
is traced (asyncvid.asyncdiff.trace) and planned. The only per-family knowledge the stage-parallel samplers hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from asyncvid.asyncdiff.costs import fake_trace
from asyncvid.asyncdiff.units import Program


@dataclass(frozen=True)
class Family:
    """`inputs(unet, *, frames, height, width, batch, scale) -> (args, kwargs)` as the family's pipeline calls the
    UNet; `frame_dim` is the axis of frames in the sample."""

    name: str
    frame_dim: int
    inputs: Callable[..., tuple[tuple, dict]]

    def example_inputs(self, unet: torch.nn.Module, **shape) -> tuple[tuple, dict]:
        return self.inputs(unet, **shape)

    def build_program(self, unet: torch.nn.Module) -> Program:
        """`unet`'s units and wiring, traced from its architecture at the default shape (add-ons change neither)."""
        return fake_trace(unet, self, {}, flops=False).program  # counting FLOPs is a third of a trace's time
