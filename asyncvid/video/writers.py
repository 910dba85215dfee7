"""Atomic writers and readers of frames: MP4 (H.264), GIF, a folder of PNG frames, and JSON sidecars."""

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from fractions import Fraction
from pathlib import Path

import numpy as np
from PIL import Image

from asyncvid.errors import UsageError

FORMATS = ("mp4", "gif", "png")


def check_frames(frames: np.ndarray) -> np.ndarray:
    """Return `frames` if it is a uint8 (F, H, W, 3) array with F >= 1, else raise ValueError."""
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 but are {frames.dtype}; convert with (x * 255).round().astype('uint8')")
    if frames.ndim != 4 or frames.shape[-1] != 3 or min(frames.shape) < 1:
        raise ValueError(f"frames must have shape (F, H, W, 3) with F, H, W >= 1 but have shape {frames.shape}")
    return frames


def check_fps(fps: int) -> int:
    """Return `fps` as an int if it is an integer >= 1, else raise ValueError."""
    if isinstance(fps, bool) or not isinstance(fps, (int, np.integer)) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1 but is {fps!r}")
    return int(fps)


@contextmanager
def _atomic_target(path: str | os.PathLike, *, overwrite: bool, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` on success, delete it on any error."""
    path = Path(path)
    if not path.parent.is_dir():
        raise UsageError(f"output folder '{path.parent}' does not exist; create it first or choose another path")
    if path.exists() and not overwrite:
        raise UsageError(f"'{path}' already exists; pass --overwrite to replace it")
    if path.exists() and path.is_dir() != is_dir:
        kind = "folder" if path.is_dir() else "file"
        raise UsageError(f"'{path}' exists and is a {kind}; remove it or choose another output name")
    # Same folder, so the rename cannot cross filesystems; the real suffix lets muxers recognise the container.
    tag = f"{os.getpid()}-{secrets.token_hex(4)}"
    tmp = path.with_name(f".{path.stem}.tmp-{tag}{path.suffix}")
    try:
        if is_dir:
            tmp.mkdir()
        yield tmp
        if not is_dir or not path.exists():
            os.replace(tmp, path)
            return
        # A folder cannot be replaced in one step: move the old one aside, rename, then delete the old one.
        old = path.with_name(f".{path.name}.old-{tag}")
        os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_mp4(
    frames: np.ndarray, fps: int, path: str | os.PathLike, *, overwrite: bool = False, crf: int = 18
) -> Path:
    """Encode frames as H.264 yuv420p MP4 with PyAV; `crf` 18 is visually lossless, 0 is lossless after yuv420p; the
    same frames give the same bytes."""
    import av  # Imported here so that reading prompts or PNGs does not need FFmpeg.

    frames, fps = check_frames(frames), check_fps(fps)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise UsageError(
            f"MP4 (yuv420p) needs an even height and width but the video is {height}x{width} (HxW); "
            "generate an even size or save as .gif or PNG frames"
        )
    if not 0 <= crf <= 51:
        raise UsageError(f"crf must be in 0..51 but is {crf}; lower is better quality (18 is the default)")
    if "libx264" not in av.codecs_available:
        raise RuntimeError("this PyAV build has no libx264 encoder; install a PyAV wheel (pip install av) that has it")
    with _atomic_target(path, overwrite=overwrite) as tmp:
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps), options={"crf": str(crf), **_x264_cpu()})
            stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
            stream.codec_context.thread_count = 1  # and no encoder threads whose scheduling could matter
            for index, frame in enumerate(frames):
                # Each frame converted to a picture of its own: left to `encode`, PyAV converts every frame into
                # one reused buffer while the encoder may still hold the last few (its lookahead), so the end of
                # a clip depended on timing and two runs of the same frames wrote different files (pixels up to
                # 14/255 apart). Timestamps are explicit for the same reason: nothing is left to the encoder.
                picture = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")
                picture.pts, picture.time_base = index, Fraction(1, fps)
                container.mux(stream.encode(picture))
            container.mux(stream.encode(None))  # flush the frames the encoder still holds
    return Path(path)


def _x264_cpu() -> dict[str, str]:
    """x264 without its AVX-512 code where the CPU has it. With it, the same frames encoded in one process came out
    two or three ways (1 to 4 of 25 encodes, their first B-frames differing; which ones depended on where buffers
    landed in memory, and two fresh CI runs of the quick start wrote different MP4s); with x264's AVX2 code all of
    180 encodes were identical, and files changed size by under 1%."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if " avx512f" in flags and " avx2" in flags else {}


def write_gif(frames: np.ndarray, fps: int, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a looping GIF with Pillow (a preview: 256 colours, delays in 10 ms units)."""
    frames, fps = check_frames(frames), check_fps(fps)
    images = [Image.fromarray(frame) for frame in frames]
    # GIF stores delays in centiseconds; round rather than let Pillow truncate. Pillow merges a frame identical
    # to the previous one into a longer frame, so playback time is kept but n_frames can be lower.
    duration = max(1, round(100 / fps)) * 10
    with _atomic_target(path, overwrite=overwrite) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)
    return Path(path)


def write_png_frames(frames: np.ndarray, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write a folder of lossless frame_0000.png, frame_0001.png, ... (for bit-exact comparisons)."""
    frames = check_frames(frames)
    digits = max(4, len(str(len(frames) - 1)))  # keep names sortable past 10000 frames
    with _atomic_target(path, overwrite=overwrite, is_dir=True) as tmp:
        for i, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"frame_{i:0{digits}d}.png", format="PNG")
    return Path(path)


def read_png_frames(path: str | os.PathLike) -> np.ndarray:
    """Read a folder written by write_png_frames back into a uint8 (F, H, W, 3) array."""
    path = Path(path)
    files = sorted(
        (f for f in path.glob("frame_*.png") if re.fullmatch(r"frame_\d+\.png", f.name)),
        key=lambda f: int(f.stem.removeprefix("frame_")),
    )
    if not files:
        raise UsageError(f"'{path}' is not a folder of frame_NNNN.png files; pass a folder written by write_png_frames")
    frames = []
    for f in files:
        with Image.open(f) as image:
            frames.append(np.asarray(image.convert("RGB")))
    return np.stack(frames)


def write_json_atomic(data: dict, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """Write `data` as indented UTF-8 JSON with a trailing newline."""
    text = json.dumps(data, indent=2, sort_keys=False, ensure_ascii=False) + "\n"  # serialise before touching disk
    with _atomic_target(path, overwrite=overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
