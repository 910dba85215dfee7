"""What the user asks for: one video's settings, in diffusers' vocabulary, validated on construction."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from asyncvid.errors import UsageError


class UsageWarning(UserWarning):
    """An input that works, but not as the user may expect: the message names the value and the fix."""


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (value < 8 or value % 8):
        suggestion = max(8, (value + 4) // 8 * 8)
        raise UsageError(f"{name} must be a positive multiple of 8 (the VAE's factor), got {value}; try {suggestion}")


def _check_common(req) -> None:
    if req.num_inference_steps < 1:
        raise UsageError(f"steps must be at least 1, got {req.num_inference_steps}; use --steps 1 or more (25 is "
                         f"the default)")
    if req.num_frames is not None and req.num_frames < 1:
        raise UsageError(f"frames must be at least 1, got {req.num_frames}; use --frames 1 or more, or leave it out "
                         f"for the model's own")
    _check_size("height", req.height)
    _check_size("width", req.width)
    if req.seed < 0 or req.seed >= 2**63:
        raise UsageError(f"seed must be in [0, 2**63), got {req.seed}; use e.g. --seed 0")
    if req.fps < 1:
        raise UsageError(f"fps must be at least 1, got {req.fps}; use e.g. --fps 8")
    if not 0 <= req.shared_noise <= 1:
        raise UsageError(f"shared noise must be in [0, 1] (the share of the initial noise the frames have in "
                         f"common; 0 turns it off, 1 gives every frame the same noise), got {req.shared_noise}; "
                         f"try --shared-noise 0.5")
    if not 0 <= req.noise_mean <= 1:
        raise UsageError(f"noise mean must be in [0, 1] (the scale of the initial noise's spatial mean; 1 keeps "
                         f"it as drawn), got {req.noise_mean}; try --noise-mean 0")


@dataclass
class TextToVideo:
    """A text-to-video request (AnimateDiff); `None` sizes and frames mean the model's defaults."""

    prompt: str
    negative_prompt: str = ""
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    fps: int = 8
    # The share of each frame's initial noise common to all frames, whose spatial means are then shared outright
    # (pipelines/initial_noise.py); 0 draws diffusers' independent noise, 1 gives every frame the same noise.
    shared_noise: float = 0.0
    # The scale of each frame's initial noise mean (per channel): 1 as drawn, 0 zero-mean noise, so that the seed
    # does not choose the background's brightness (pipelines/initial_noise.py).
    noise_mean: float = 1.0
    # The frames also share their initial noise's means over each cell of a G x G grid of the latent frame (its
    # lowest spatial frequencies); 1: only the whole frame's mean (pipelines/initial_noise.py).
    shared_grid: int = 1

    def __post_init__(self):
        if not self.prompt.strip():
            raise UsageError("prompt is empty; write what the video should show")
        if not 0 <= self.guidance_scale < math.inf:  # also refuses nan, which JSON sidecars cannot hold
            raise UsageError(f"guidance must be a number >= 0 (1 disables guidance), got {self.guidance_scale}; "
                             f"try --guidance 7.5")
        _check_common(self)
        # The latent frame's side (the VAE's factor is 8); unsized, the smallest model's (tiny-animatediff: 64 px).
        side = min(self.height or 64, self.width or 64) // 8
        grid = self.shared_grid
        if isinstance(grid, bool) or not isinstance(grid, int) or not 1 <= grid <= side:
            raise UsageError(f"shared grid must be a whole number from 1 to the latent frame's side ({side} at this "
                             f"size), got {grid!r}; try --shared-grid 1")

    def describe(self) -> dict:
        return {"task": "text-to-video", **asdict(self)}


@dataclass
class ImageToVideo:
    """An image-to-video request (Stable Video Diffusion); `None` sizes and frames mean the model's defaults."""

    image: Path
    num_frames: int | None = None
    height: int | None = None
    width: int | None = None
    num_inference_steps: int = 25
    min_guidance_scale: float = 1.0
    max_guidance_scale: float = 3.0
    motion_bucket_id: int = 127
    noise_aug_strength: float = 0.02
    decode_chunk_size: int | None = None
    seed: int = 0
    fps: int = 7
    # As TextToVideo's: the share of the frames' initial noise they have in common, and its mean's scale
    # (pipelines/initial_noise.py). With 0 and 1 the pipeline draws its own noise; otherwise it is drawn first, before
    # the image's noise augmentation, so any other value is a new draw of both.
    shared_noise: float = 0.0
    noise_mean: float = 1.0
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.image = Path(self.image)
        if not 0 <= self.min_guidance_scale <= self.max_guidance_scale < math.inf:  # also refuses nan
            raise UsageError(
                f"guidance range must satisfy 0 <= min <= max, got min {self.min_guidance_scale} and max "
                f"{self.max_guidance_scale}; give a --max-guidance at least the --min-guidance (SVD's ramp: "
                f"--min-guidance 1 --max-guidance 3)"
            )
        if not 0 <= self.motion_bucket_id <= 1023:
            raise UsageError(f"motion bucket id must be in [0, 1023], got {self.motion_bucket_id}; use e.g. "
                             f"--motion-bucket-id 127 (the default; higher moves more)")
        if not 0 <= self.noise_aug_strength < math.inf:
            raise UsageError(f"noise augmentation strength must be a number >= 0, got {self.noise_aug_strength}; use "
                             f"e.g. --noise-aug-strength 0.02 (the default)")
        if self.decode_chunk_size is not None and self.decode_chunk_size < 1:
            raise UsageError(f"decode chunk size must be at least 1, got {self.decode_chunk_size}; use --decode-chunk-size "
                             f"1 or more, or leave it out to decode every frame at once")
        _check_common(self)

    def describe(self) -> dict:
        d = {"task": "image-to-video", **asdict(self)}
        d["image"] = str(self.image)
        d.pop("extra")
        return d
