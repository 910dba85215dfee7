"""The initial noise of a video, with a part shared by its frames: PYoCo's mixed noise prior (Ge et al., 2023,
"Preserve Your Own Correlation"), with each frame's spatial mean shared outright.

A video model trained on independent noise per frame reads a frame's noise mean as that frame's brightness, so
independent means make the background flicker from frame to frame (docs/MODELS.md, round 12). Every frame stays
N(0, I), so the spatial layers see the noise they were trained on; only what the frames have in common changes.
That common mean can also be scaled down to zero (`scaled_mean`), for a model that should not take the background's
brightness from the seed, and the frames can share more than the mean: the noise's means over a grid of cells, its
lowest spatial frequencies, which FreeInit (Wu et al., 2023) finds set a video's layout and its temporal consistency
(`grid`; docs/MODELS.md, round 38). At a share of 1 the frames start from one noise: a frame's own noise also sets
where the model draws the object in it, so its steps come out uneven (round 39).
"""

from __future__ import annotations

import math

import torch
from diffusers.utils.torch_utils import randn_tensor


def initial_noise(shape: tuple[int, ...], *, frame_dim: int, share: float, mean: float, grid: int,
                  generator: torch.Generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
    """A request's initial latents: None where it asks for none of the three (the pipeline draws its own, as it
    always has); diffusers' draw with its means scaled where only `mean` is set; else `shared_frame_noise`."""
    if not share and mean == 1 and grid == 1:
        return None
    if not share and grid == 1:
        return scaled_mean(randn_tensor(shape, generator=generator, device=device, dtype=dtype), mean)
    return shared_frame_noise(shape, frame_dim=frame_dim, share=share, generator=generator, device=device,
                              dtype=dtype, mean=mean, grid=grid)


def shared_frame_noise(shape: tuple[int, ...], *, frame_dim: int, share: float, generator: torch.Generator,
                       device: torch.device, dtype: torch.dtype, mean: float = 1.0, grid: int = 1) -> torch.Tensor:
    """Noise of `shape` (..., H, W) whose frames (along `frame_dim`) are each N(0, I), with their spatial means
    common to all frames and `share` of the rest's variance too: sqrt(share) * common + sqrt(1 - share) * own (1:
    every frame the same noise, PYoCo's prior in its limit). `mean` scales the common spatial means (`scaled_mean`);
    `grid` G > 1 makes the means over each cell of a G x G grid common, not only the whole frame's (`cell_means`)."""
    if not 0 <= share <= 1:
        raise ValueError(f"share must be in [0, 1], got {share}")
    if not 1 <= grid <= min(shape[-2:]):
        raise ValueError(f"grid must be from 1 to the noise's height and width {tuple(shape[-2:])}, got {grid}")
    own = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
    common_shape = list(shape)
    common_shape[frame_dim] = 1
    common = randn_tensor(tuple(common_shape), generator=generator, device=device, dtype=torch.float32)
    mixed = math.sqrt(share) * common + math.sqrt(1 - share) * own
    # A white Gaussian's cell means are independent of the rest, so swapping in the common frame's keeps N(0, I).
    shared = mixed - cell_means(mixed, grid) + cell_means(common, grid)
    return scaled_mean(shared, mean).to(dtype)


def cell_means(noise: torch.Tensor, grid: int) -> torch.Tensor:
    """Each pixel of `noise` (..., H, W) replaced by the mean of its cell in a `grid` x `grid` split of the frame
    (cells as even as the size allows): the orthogonal projection onto the grid's piecewise-constant frames, so what
    it leaves is independent of it in white noise. Grid 1: the frame's spatial mean (broadcastable)."""
    if grid == 1:
        return noise.mean((-2, -1), keepdim=True)
    height, width = noise.shape[-2:]
    rows = torch.nn.functional.one_hot(torch.arange(height, device=noise.device) * grid // height, grid).to(noise)
    cols = torch.nn.functional.one_hot(torch.arange(width, device=noise.device) * grid // width, grid).to(noise)
    means = torch.einsum("...hw,hi,wj->...ij", noise, rows / rows.sum(0), cols / cols.sum(0))
    return torch.einsum("...ij,hi,wj->...hw", means, rows, cols)


def scaled_mean(noise: torch.Tensor, mean: float) -> torch.Tensor:
    """`noise` with each frame's spatial mean (per channel) scaled by `mean`; 0 leaves every frame's noise with a zero
    mean. A model trained on one background tone reads that mean as the background's brightness (docs/MODELS.md,
    round 37): drawn from the seed, it sets a darker or lighter background than the model learnt, and there it
    flickers; at 0 every seed starts from the mean the model expects most."""
    if not 0 <= mean <= 1:
        raise ValueError(f"mean must be in [0, 1], got {mean}")
    if mean == 1:
        return noise
    return noise - (1 - mean) * noise.mean((-2, -1), keepdim=True)
