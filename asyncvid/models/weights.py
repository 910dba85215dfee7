"""A UNet's skeleton: its modules with every parameter on the meta device, to plan with and to fill stage by stage."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers.models.modeling_utils import no_init_weights


def skeleton(unet_class, folder: Path) -> torch.nn.Module:
    """The UNet with every parameter on the meta device (buffers stay real: they are computed, not loaded)."""
    return empty_model(unet_class, unet_class.load_config(folder))


def empty_model(model_class, config, *, real_buffers: bool = True) -> torch.nn.Module:
    """`model_class` built from `config` with its parameters on the meta device, its buffers too unless
    `real_buffers` (those are computed at construction, not loaded)."""
    # torch.nn.init skipped, as diffusers' from_pretrained does: initialising meta tensors runs torch's Python
    # decompositions, most of a skeleton's time (tiny-animatediff's UNet: 0.64 s with them, 0.15 s without), for
    # values never kept.
    with no_init_weights(), init_empty_weights(include_buffers=False) if real_buffers else torch.device("meta"):
        return model_class.from_config(config).eval()
