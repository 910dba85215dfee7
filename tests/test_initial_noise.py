"""Initial noise shared by the frames (PYoCo's mixed noise prior, with the frames' spatial means common): every
frame stays standard normal; the frames' means are equal and the rest correlates by the share asked for."""

import pytest
import torch

from asyncvid.pipelines.initial_noise import shared_frame_noise

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


def test_the_share_must_leave_each_frame_its_own_part():
    with pytest.raises(ValueError, match="1.0"):
        shared_frame_noise((1, 4, 2, 8, 8), frame_dim=2, share=1.0, generator=torch.Generator(), device=CPU,
                           dtype=torch.float32)
