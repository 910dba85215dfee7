"""What a stage computes on after warm-up, when its inputs are one round old (AsyncDiff's stale activations).

"reuse": the last round's tensors as they are (Chen et al., NeurIPS 2024). "extrapolate": a first-order prediction
along the trajectory from the last two rounds, h + (h - h_before): a stage's input moves smoothly from step to step,
so most of the one-round lag cancels. It costs no communication (each rank keeps the inputs it received one round
before) and one more copy of them in memory. The hook and the oracle both call `predicted`, so they agree bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

STALE = ("reuse", "extrapolate")


def predicted(inputs: dict[int, torch.Tensor], before: dict[int, torch.Tensor], stale: str) -> dict[int, torch.Tensor]:
    """This round's inputs of a stage: `inputs` (from the last round), extrapolated with `before` (the round before)
    where that round exists (the first round after a single warm-up step has only one)."""
    if stale == "reuse" or not before:
        return dict(inputs)
    import torch  # here, not at the top: the CLI imports this module before it loads torch

    # before + 2 (value - before) = value + (value - before), in one kernel per tensor
    return {key: torch.lerp(before[key], value, 2.0) for key, value in inputs.items()}
