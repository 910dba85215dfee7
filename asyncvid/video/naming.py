"""Prompt files in, safe output names out: one prompt per line becomes `NNN-slug.mp4` inside the output folder."""

import os
import re
import unicodedata
from pathlib import Path

from asyncvid.errors import UsageError
from asyncvid.video.writers import FORMATS

_FIX = "pass a text file with one prompt per line"


def read_prompts(path: str | os.PathLike) -> list[str]:
    """The prompts in a UTF-8 file: one per line, stripped; blank lines and lines starting with '#' are skipped."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"prompt file '{path}' does not exist; {_FIX}")
    if path.is_dir():
        raise UsageError(f"prompt file '{path}' is a folder; {_FIX}")
    try:
        data = path.read_bytes()
    except PermissionError:
        msg = f"prompt file '{path}' is not readable (permission denied); chmod u+r it or pass another file"
        raise UsageError(msg) from None
    except OSError as e:
        raise UsageError(f"prompt file '{path}' cannot be read ({e.strerror}); {_FIX}") from None
    if b"\x00" in data:
        # UTF-16 (a common Windows editor default) is the usual source of NUL bytes in a text file.
        raise UsageError(f"prompt file '{path}' looks binary (it contains NUL bytes); save it as UTF-8 text")
    try:
        text = data.decode("utf-8-sig")  # -sig: tolerate the byte-order mark some editors write
    except UnicodeDecodeError as e:
        raise UsageError(
            f"prompt file '{path}' is not UTF-8 (bad byte 0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8"
        ) from None
    # Split on line ends only (\n, \r\n, \r), not on the other characters str.splitlines() treats as breaks.
    lines = (line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"))
    # A '#' later in a line is kept: prompts may contain it ("a #1 hit record").
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UsageError(f"prompt file '{path}' has no prompts (only blank lines or # comments); {_FIX}")
    return prompts


def slugify(text: str, max_len: int = 48) -> str:
    """A lowercase ASCII name for `text`: [a-z0-9] runs joined by '-', at most `max_len` long, never empty."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1 but is {max_len}")
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_text).strip("-")
    if len(slug) > max_len:
        # Cut at the last '-' that keeps whole words, unless that would leave nothing.
        head = slug[:max_len]
        cut = len(head) if slug[max_len] == "-" else head.rfind("-")
        slug = (head[:cut] if cut > 0 else head).strip("-")
    return slug or "video"[:max_len]


def output_stem(index: int, text: str) -> str:
    """`NNN-slug`: the index makes the name unique within a run, the slug makes it readable."""
    if index < 0:
        raise ValueError(f"index must be >= 0 but is {index}")
    return f"{index:03d}-{slugify(text)}"


def output_path(out_dir: str | os.PathLike, stem: str, fmt: str) -> Path:
    """The output for `stem` directly inside `out_dir`: `stem.mp4`, `stem.gif`, or a folder `stem` of PNG frames."""
    if fmt not in FORMATS:
        raise UsageError(f"unknown output format {fmt!r}; use one of {', '.join(FORMATS)}")
    root = Path(out_dir).resolve()
    name = stem if fmt == "png" else f"{stem}.{fmt}"
    # Stems come from slugify, so this only fails on a bug or a symlink planted in the output folder.
    if name in ("", ".", "..") or "/" in name or "\x00" in name or (os.altsep and os.altsep in name) or os.sep in name:
        raise UsageError(f"output name {name!r} is not a plain file name; use a name without path separators")
    if (root / name).resolve().parent != root:
        raise UsageError(f"output '{root / name}' resolves outside '{root}'; remove the symlink or use another folder")
    return root / name


def sidecar_path(target: str | os.PathLike) -> Path:
    """The JSON metadata file beside an output: `001-x.mp4` -> `001-x.json`, folder `001-x` -> `001-x.json`."""
    target = Path(target)
    name = target.stem if target.suffix.lower() in (".mp4", ".gif") else target.name
    return target.with_name(name + ".json")
