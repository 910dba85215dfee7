"""Tests for asyncvid.requests and asyncvid.models.devices: every bad value is refused with a message that names it."""

from pathlib import Path

import pytest
import torch

from asyncvid.errors import UsageError
from asyncvid.models.devices import resolve_device, resolve_dtype
from asyncvid.requests import ImageToVideo, TextToVideo

CPU = torch.device("cpu")


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


# --- TextToVideo -------------------------------------------------------------------------------------------------


def test_text_to_video_keeps_settings_and_describes_itself():
    req = TextToVideo("a red circle", num_frames=4, height=64, width=96, num_inference_steps=2, seed=3, fps=12)
    assert req.describe() == {
        "task": "text-to-video", "prompt": "a red circle", "negative_prompt": "", "num_frames": 4, "height": 64,
        "width": 96, "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 3, "fps": 12, "shared_noise": 0.0,
        "noise_mean": 1.0, "shared_grid": 1,
    }


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_shared_noise_takes_both_ends(share):
    """0: each frame's own noise; 1: every frame the same noise (tiny-animatediff's, round 39)."""
    assert TextToVideo("x", shared_noise=share).shared_noise == share


def test_text_to_video_none_means_model_defaults():
    req = TextToVideo("x")
    assert (req.num_frames, req.height, req.width) == (None, None, None)


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(num_inference_steps=0), "steps must be at least 1, got 0"),
        (dict(num_inference_steps=-3), "steps must be at least 1, got -3"),
        (dict(num_frames=0), "frames must be at least 1, got 0"),
        (dict(height=65), "height must be a positive multiple of 8 (the VAE's factor), got 65"),
        (dict(height=0), "height must be a positive multiple of 8 (the VAE's factor), got 0"),
        (dict(width=100), "width must be a positive multiple of 8 (the VAE's factor), got 100"),
        (dict(width=-8), "width must be a positive multiple of 8 (the VAE's factor), got -8"),
        (dict(seed=-1), "seed must be in [0, 2**63), got -1"),
        (dict(seed=2**63), f"seed must be in [0, 2**63), got {2**63}"),
        (dict(fps=0), "fps must be at least 1, got 0"),
        (dict(guidance_scale=-0.5), "guidance must be a number >= 0 (1 disables guidance), got -0.5"),
        (dict(shared_noise=1.5), "shared noise must be in [0, 1]"),
        (dict(shared_noise=-0.1), "got -0.1; try --shared-noise 0.5"),
        (dict(shared_noise=float("nan")), "got nan"),
        (dict(noise_mean=1.5), "noise mean must be in [0, 1]"),
        (dict(noise_mean=-0.5), "got -0.5; try --noise-mean 0"),
        (dict(noise_mean=float("nan")), "got nan"),
        (dict(shared_grid=0), "shared grid must be a whole number from 1 to the latent frame's side (8 at this size)"),
        (dict(shared_grid=9), "got 9; try --shared-grid 1"),
        (dict(shared_grid=4, height=16), "(2 at this size), got 4"),
        (dict(shared_grid=2.5), "got 2.5"),
        (dict(shared_grid=True), "got True"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_text_to_video_refuses_bad_values(kwargs, shown):
    with pytest.raises(UsageError) as info:
        TextToVideo("a red circle", **kwargs)
    assert shown in str(info.value)


def test_bad_size_message_suggests_a_multiple_of_8():
    with pytest.raises(UsageError, match=r"height .* got 65; try 64"):
        TextToVideo("x", height=65)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_text_to_video_refuses_an_empty_prompt(prompt):
    with pytest.raises(UsageError, match="prompt is empty"):
        TextToVideo(prompt)


@pytest.mark.parametrize("seed", [0, 2**63 - 1])
def test_text_to_video_accepts_the_seed_range_ends(seed):
    assert TextToVideo("x", seed=seed).seed == seed


# --- ImageToVideo ------------------------------------------------------------------------------------------------


def test_image_to_video_turns_the_image_into_a_path_and_describes_it_as_text():
    req = ImageToVideo("samples/red_circle.png", num_frames=4, num_inference_steps=2, extra={"k": 1})
    assert req.image == Path("samples/red_circle.png")
    described = req.describe()
    assert described["task"] == "image-to-video"
    assert described["image"] == "samples/red_circle.png"
    assert "extra" not in described
    assert (described["num_frames"], described["num_inference_steps"]) == (4, 2)
    assert (described["shared_noise"], described["noise_mean"]) == (0.0, 1.0)  # diffusers' own draw
    assert ImageToVideo("x.png", shared_noise=1, noise_mean=0).describe()["shared_noise"] == 1


@pytest.mark.parametrize(
    "kwargs, shown",
    [
        (dict(min_guidance_scale=3.5, max_guidance_scale=1.5), "min 3.5 and max 1.5"),
        (dict(min_guidance_scale=-1.0), "min -1.0"),
        (dict(motion_bucket_id=1024), "got 1024"),
        (dict(motion_bucket_id=-1), "got -1"),
        (dict(noise_aug_strength=-0.25), "got -0.25"),
        (dict(decode_chunk_size=0), "got 0"),
        (dict(num_inference_steps=0), "steps must be at least 1, got 0"),
        (dict(num_frames=-2), "frames must be at least 1, got -2"),
        (dict(height=12), "height must be a positive multiple of 8"),
        (dict(width=7), "width must be a positive multiple of 8"),
        (dict(seed=-5), "got -5"),
        (dict(fps=0), "fps must be at least 1, got 0"),
        (dict(shared_noise=1.5), "shared noise must be in [0, 1]"),
        (dict(shared_noise=float("nan")), "got nan"),
        (dict(noise_mean=-0.5), "got -0.5; try --noise-mean 0"),
    ],
    ids=lambda v: str(v) if isinstance(v, dict) else "",
)
def test_image_to_video_refuses_bad_values(kwargs, shown):
    with pytest.raises(UsageError) as info:
        ImageToVideo("samples/red_circle.png", **kwargs)
    assert shown in str(info.value)


# --- devices -----------------------------------------------------------------------------------------------------


def test_default_dtype_is_float32_on_cpu_and_float16_on_cuda():
    # torch.device("cuda") is only a description: building it needs no GPU.
    assert resolve_dtype(None, CPU) is torch.float32
    assert resolve_dtype(None, torch.device("cuda")) is torch.float16


@pytest.mark.parametrize("name, dtype", [("float32", torch.float32), ("bfloat16", torch.bfloat16)])
def test_explicit_dtypes_on_cpu(name, dtype):
    assert resolve_dtype(name, CPU) is dtype


def test_float16_is_refused_on_cpu_but_allowed_on_cuda():
    with pytest.raises(UsageError, match="float16 is not supported on the CPU"):
        resolve_dtype("float16", CPU)
    assert resolve_dtype("float16", torch.device("cuda")) is torch.float16


def test_unknown_dtype_is_refused_by_name():
    with pytest.raises(UsageError, match="'float64'"):
        resolve_dtype("float64", CPU)


def test_cpu_device_and_default_device():
    assert resolve_device("cpu") == CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(None).type == expected


def test_nonsense_device_is_refused_by_name():
    with pytest.raises(UsageError, match="'warp-drive'"):
        resolve_device("warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0"])
def test_cuda_is_refused_without_a_gpu(spec):
    with pytest.raises(UsageError, match=f"device '{spec}' requested but no CUDA GPU"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_index_past_the_visible_gpus_is_refused():
    spec = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(UsageError, match=f"'{spec}' does not exist"):
        resolve_device(spec)
