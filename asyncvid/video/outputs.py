"""Where videos go: one target per video decided before any work, the video and its JSON sidecar."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from asyncvid.errors import UsageError
from asyncvid.video.frames import Video
from asyncvid.video.naming import output_path, sidecar_path
from asyncvid.video.writers import write_json_atomic


def plan_targets(out: Path, stems: list[str], fmt: str, *, overwrite: bool) -> list[Path]:
    """The output path of each video; refuses existing ones up front unless `overwrite`."""
    targets = [output_path(out, stem, fmt) for stem in stems]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise UsageError(f"output '{target}' already exists; pass --overwrite to replace it")
    return targets


def save_with_sidecar(video: Video, target: Path, fmt: str, *, overwrite: bool) -> Path:
    """Write the video, then its JSON sidecar (prompt or image, seed, model, settings, versions, timings).

    A full disk (or any other refusal to write) leaves neither: the writers delete their temporary files, and a
    video whose sidecar cannot be written is removed, so no output lacks its record.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)  # the output folder appears with its first video
        written = video.save(target, format=fmt, overwrite=overwrite)
    except OSError as err:
        if err.errno is None:
            raise  # not a refusal by the system but a bug: keep its traceback
        raise _write_error(err, target) from err
    try:
        write_json_atomic({"output": written.name, **video.metadata}, sidecar_path(written), overwrite=True)
    except OSError as err:
        if written.is_dir():
            shutil.rmtree(written, ignore_errors=True)
        else:
            written.unlink(missing_ok=True)
        if err.errno is None:
            raise
        raise _write_error(err, sidecar_path(written)) from err
    return written


def _write_error(err: OSError, path: Path) -> UsageError:
    """A one-line error for a write the system refused (disk full, read-only, permission denied)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or pass --out on another disk"
    else:
        fix = "pass --out with a writable folder"
    return UsageError(f"cannot write '{path}' ({err.strerror or os.strerror(err.errno)}); {fix}")
