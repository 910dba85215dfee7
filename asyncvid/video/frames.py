"""A generated video: uint8 RGB frames, fps and metadata, with `save` in any of the writers' formats."""

import base64
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from asyncvid.errors import UsageError
from asyncvid.video.writers import FORMATS, check_fps, check_frames, write_gif, write_mp4, write_png_frames


def to_uint8(frames: np.ndarray) -> np.ndarray:
    """Float frames in [0, 1] to uint8 with rounding (what every writer stores)."""
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


@dataclass
class Video:
    """RGB frames as a uint8 (F, H, W, 3) array, played at `fps` frames per second."""

    frames: np.ndarray
    fps: int
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.frames = check_frames(self.frames)
        self.fps = check_fps(self.fps)

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def height(self) -> int:
        return self.frames.shape[1]

    @property
    def width(self) -> int:
        return self.frames.shape[2]

    def __repr__(self) -> str:
        # The default dataclass repr would print every pixel.
        return f"Video(num_frames={self.num_frames}, height={self.height}, width={self.width}, fps={self.fps})"

    def pil_frames(self) -> list[Image.Image]:
        """The frames as RGB PIL images."""
        return [Image.fromarray(frame) for frame in self.frames]

    def save(self, path: str | os.PathLike, format: str | None = None, overwrite: bool = False) -> Path:
        """Write the video; the format comes from `format` or the suffix (.mp4, .gif; none means PNG frames)."""
        path = Path(path)
        format = format or _format_from_suffix(path)
        if format == "mp4":
            return write_mp4(self.frames, self.fps, path, overwrite=overwrite)
        if format == "gif":
            return write_gif(self.frames, self.fps, path, overwrite=overwrite)
        if format == "png":
            return write_png_frames(self.frames, path, overwrite=overwrite)
        raise UsageError(f"unknown video format {format!r}; use one of {', '.join(FORMATS)}")

    def _repr_html_(self) -> str:
        """Jupyter preview: the MP4 inlined as base64."""
        # Crop odd edges: a preview should not fail where yuv420p needs even sizes.
        frames = self.frames[:, : self.height // 2 * 2, : self.width // 2 * 2]
        with tempfile.TemporaryDirectory() as tmp:
            data = write_mp4(frames, self.fps, Path(tmp) / "preview.mp4").read_bytes()
        src = "data:video/mp4;base64," + base64.b64encode(data).decode("ascii")
        return f'<video controls autoplay loop muted width="{self.width}" src="{src}"></video>'


def _format_from_suffix(path: Path) -> str:
    """'mp4' or 'gif' from the suffix, 'png' (a folder of frames) when there is none."""
    suffix = path.suffix.lower()
    if suffix in ("", ".mp4", ".gif"):
        return suffix[1:] or "png"
    raise UsageError(
        f"cannot tell the video format of '{path}'; use a .mp4 or .gif suffix, or no suffix for a folder of PNG frames"
    )


