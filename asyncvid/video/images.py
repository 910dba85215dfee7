"""Conditioning images in: open a PNG or JPEG as RGB, with a one-line error for every way a file can be unusable."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, UnidentifiedImageError

from asyncvid.errors import UsageError

MIN_SIDE = 8  # the pipeline's resize pads by a pixel: a 1-pixel side fails inside torch
MAX_PIXELS = 4096 * 4096  # larger images take the pipeline's CPU resize minutes: downscale them once instead


def load_image(path: Path) -> Image.Image:
    """Open the conditioning image as RGB, with one-line errors for missing, unreadable, corrupt, non-image, tiny
    and huge files; decodes every pixel, so a truncated file fails here and not mid-run."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"image '{path}' is a folder; pass a PNG or JPEG file")
    if not path.is_file():
        raise UsageError(f"image '{path}' does not exist; pass a PNG or JPEG file")
    try:
        with Image.open(path) as im:
            size = im.size  # from the header: a huge image is refused before it is decoded
            rgb = None if _bad_size(*size) else im.convert("RGB")
    except PermissionError:
        msg = f"image '{path}' is not readable (permission denied); chmod u+r it or pass another file"
        raise UsageError(msg) from None
    except UnidentifiedImageError:
        raise UsageError(f"image '{path}' is not a readable image (unknown format); pass a PNG or JPEG file") from None
    except Image.DecompressionBombError:
        raise UsageError(f"image '{path}' is too large to open safely; downscale it to at most 4096x4096") from None
    except (OSError, SyntaxError, ValueError) as err:
        # Pillow reports truncated or damaged data as OSError / SyntaxError with a reason worth showing.
        raise UsageError(f"image '{path}' is corrupt or truncated ({err}); pass a complete PNG or JPEG file") from None
    if rgb is None:
        _refuse_size(path, *size)
    return rgb


def _bad_size(width: int, height: int) -> bool:
    return min(width, height) < MIN_SIDE or width * height > MAX_PIXELS


def _refuse_size(path: Path, width: int, height: int) -> None:
    if min(width, height) < MIN_SIDE:
        raise UsageError(f"image '{path}' is {width}x{height} pixels; pass one at least {MIN_SIDE}x{MIN_SIDE} (the "
                         f"pipeline resizes it to the video's size)")
    if width * height > MAX_PIXELS:
        raise UsageError(f"image '{path}' is {width}x{height} pixels ({width * height / 1e6:.0f} MP); downscale it to at "
                         f"most {MAX_PIXELS / 1e6:.1f} MP (e.g. 1024 pixels wide) first: the pipeline's resize of "
                         f"larger images takes minutes")
