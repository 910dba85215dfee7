"""Where videos go: the output folder, one target per video decided before any work, and the JSON sidecar."""

from __future__ import annotations

import tempfile
from pathlib import Path

from .errors import UsageError
from .naming import output_path, sidecar_path
from .video import Video, write_json_atomic


def prepare_out_dir(out: Path) -> Path:
    """Create `out` if needed and prove it is writable, so no sampling is wasted on an unwritable target."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"output folder '{out}' is not writable ({err.strerror}); pass --out with a writable folder")
    return out.resolve()


def plan_targets(out: Path, stems: list[str], fmt: str, *, overwrite: bool) -> list[Path]:
    """The output path of each video; refuses existing ones up front unless `overwrite`."""
    targets = [output_path(out, stem, fmt) for stem in stems]
    if not overwrite:
        for target in targets:
            if target.exists():
                raise UsageError(f"output '{target}' already exists; pass --overwrite to replace it")
    return targets


def save_with_sidecar(video: Video, target: Path, fmt: str, *, overwrite: bool) -> Path:
    """Write the video, then its JSON sidecar (prompt or image, seed, model, settings, versions, timings)."""
    written = video.save(target, format=fmt, overwrite=overwrite)
    write_json_atomic({"output": written.name, **video.metadata}, sidecar_path(written), overwrite=True)
    return written
