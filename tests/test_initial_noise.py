"""Initial noise shared by the frames (PYoCo's mixed noise prior, with the frames' spatial means common): every
frame stays standard normal; the frames' means are equal and the rest correlates by the share asked for."""

import pytest
import torch

from asyncvid.pipelines.initial_noise import cell_means, scaled_mean, shared_frame_noise

CPU = torch.device("cpu")


@pytest.mark.parametrize("share", [0.0, 0.5, 0.8])
def test_each_frame_is_standard_normal_and_the_frames_share_their_means_and_a_part(share):
    noise = shared_frame_noise((2000, 4, 8, 8, 8), frame_dim=2, share=share, generator=torch.Generator().manual_seed(0),
                               device=CPU, dtype=torch.float32)
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01
    means = noise.mean((-2, -1))  # (videos, channels, frames)
    assert torch.allclose(means, means[:, :, :1].expand_as(means), atol=1e-6)
    assert abs(float(means.std()) - 1 / 8) < 0.005  # a white 8x8 frame's mean: as independent noise has it
    rest = noise - means[..., None, None]
    correlation = float((rest[:, :, 0] * rest[:, :, 5]).mean() / rest[:, :, 0].square().mean())
    assert abs(correlation - share) < 0.01


@pytest.mark.parametrize("grid", [1, 4])
def test_share_1_gives_every_frame_the_same_standard_normal_noise(grid):
    """The prior's limit (round 39: tiny-animatediff's steps come out even when no frame has noise of its own to
    read its place from); a grid has nothing left to share."""
    noise = shared_frame_noise((500, 4, 6, 8, 8), frame_dim=2, share=1.0, generator=torch.Generator().manual_seed(0),
                               device=CPU, dtype=torch.float32, grid=grid)
    assert torch.allclose(noise, noise[:, :, :1].expand_as(noise), atol=1e-6)
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01


@pytest.mark.parametrize("share", [-0.1, 1.5])
def test_a_share_outside_0_to_1_is_refused(share):
    with pytest.raises(ValueError, match=str(share)):
        shared_frame_noise((1, 4, 2, 8, 8), frame_dim=2, share=share, generator=torch.Generator(), device=CPU,
                           dtype=torch.float32)


@pytest.mark.parametrize("mean", [0.0, 0.5])
def test_the_noise_mean_scales_the_frames_common_mean_and_leaves_the_rest(mean):
    """`mean` 0: every frame's noise has zero spatial mean per channel, so the seed does not set the background's
    brightness (round 37); the part below the mean is the same noise as drawn at 1."""
    draw = dict(shape=(64, 4, 8, 8, 8), frame_dim=2, share=0.5, device=CPU, dtype=torch.float32)
    drawn = shared_frame_noise(**draw, generator=torch.Generator().manual_seed(0))
    scaled = shared_frame_noise(**draw, generator=torch.Generator().manual_seed(0), mean=mean)
    means = drawn.mean((-2, -1), keepdim=True)
    assert torch.allclose(scaled.mean((-2, -1), keepdim=True), mean * means, atol=1e-6)
    assert torch.allclose(scaled - scaled.mean((-2, -1), keepdim=True), drawn - means, atol=1e-6)
    assert float(means.abs().max()) > 0.3  # the drawn means are not already zero


def test_scaled_mean_keeps_the_noise_at_one_and_refuses_a_scale_outside_0_to_1():
    noise = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    assert scaled_mean(noise, 1.0) is noise
    assert float(scaled_mean(noise, 0.0).mean((-2, -1)).abs().max()) < 1e-6
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match=str(bad)):
            scaled_mean(noise, bad)


@pytest.mark.parametrize("grid", [2, 4])
def test_a_grid_shares_each_cells_mean_and_keeps_each_frame_standard_normal(grid):
    """`grid` G: the frames' means over each cell of a G x G grid are common (the noise's coarsest pattern, round
    38), each frame is still N(0, I), and below the cells the frames keep their own part and the share."""
    noise = shared_frame_noise((2000, 4, 6, 8, 8), frame_dim=2, share=0.5, generator=torch.Generator().manual_seed(0),
                               device=CPU, dtype=torch.float32, grid=grid)
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01
    cells = noise.unflatten(-2, (grid, -1)).unflatten(-1, (grid, -1)).mean((-3, -1))  # (..., frames, grid, grid)
    assert torch.allclose(cells, cells[:, :, :1].expand_as(cells), atol=1e-5)
    assert abs(float(cells.std()) - grid / 8) < 0.01  # a white cell's mean: as independent noise has it
    rest = noise - cell_means(noise, grid)
    correlation = float((rest[:, :, 0] * rest[:, :, 5]).mean() / rest[:, :, 0].square().mean())
    assert abs(correlation - 0.5) < 0.01


def test_grid_1_is_the_frames_mean_and_a_grid_past_the_frame_is_refused():
    draw = dict(shape=(2, 4, 3, 8, 8), frame_dim=2, share=0.5, device=CPU, dtype=torch.float32)
    assert torch.equal(shared_frame_noise(**draw, generator=torch.Generator().manual_seed(0)),
                       shared_frame_noise(**draw, generator=torch.Generator().manual_seed(0), grid=1))
    with pytest.raises(ValueError, match="got 9"):
        shared_frame_noise(**draw, generator=torch.Generator(), grid=9)


@pytest.mark.parametrize("size", [(8, 8), (6, 7)])
def test_cell_means_is_a_projection_onto_the_grids_cells(size):
    """Idempotent and orthogonal (what it leaves has zero mean in every cell), for uneven cells too."""
    noise = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    cells = cell_means(noise, 4)
    assert torch.allclose(cell_means(cells, 4), cells, atol=1e-6)
    assert torch.allclose(cell_means(noise - cells, 4), torch.zeros_like(noise), atol=1e-6)
    assert len(torch.unique(cells[0].round(decimals=5))) == 16
