"""A UNet's skeleton: its modules with every parameter on the meta device, to plan with and to fill stage by stage."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import init_empty_weights


def skeleton(unet_class, folder: Path) -> torch.nn.Module:
    """The UNet with every parameter on the meta device (buffers stay real: they are computed, not loaded)."""
    with init_empty_weights(include_buffers=False):
        return unet_class.from_config(unet_class.load_config(folder)).eval()
