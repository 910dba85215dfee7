"""Same seed and settings give the same PNG frames on the CPU: across separate processes for sequential sampling,
and across runs for AsyncDiff on 2 processes. (AsyncDiff with --warmup = --steps matching sequential sampling
bit for bit is tested in test_asyncdiff_cli.py.)"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from asyncvid.cli.app import app
from asyncvid.video.writers import read_png_frames

pytestmark = pytest.mark.slow
PROMPTS = "a red circle moving left\n"
FAST = ["--steps", "2", "--frames", "4", "--format", "png"]


def png_outputs(out: Path) -> dict[str, tuple[np.ndarray, list[bytes]]]:
    """Each output folder's frames, decoded and as the PNG files' bytes."""
    return {
        folder.name: (read_png_frames(folder), [f.read_bytes() for f in sorted(folder.glob("frame_*.png"))])
        for folder in sorted(out.iterdir())
        if folder.is_dir()
    }


def assert_identical(first: dict, second: dict, count: int) -> None:
    assert first.keys() == second.keys() and len(first) == count, (sorted(first), sorted(second))
    for name, (frames, files) in first.items():
        assert frames.std() > 0, f"{name} is blank"
        assert np.array_equal(frames, second[name][0]), name
        assert files == second[name][1], f"{name}: same pixels but different PNG bytes"


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


def asyncvid_command() -> list[str]:
    script = Path(sys.executable).with_name("asyncvid")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "asyncvid.cli.app"]


def test_sequential_generate_is_identical_across_processes(prompts, tmp_path):
    # Separate interpreters with different hash seeds: nothing may depend on set order, ids or process state.
    runs = []
    for i, hash_seed in enumerate(("1", "2")):
        out = tmp_path / f"run{i}"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        proc = subprocess.run([*asyncvid_command(), "generate", str(prompts), *FAST, "--seed", "5", "--out", str(out)],
                              capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        runs.append(png_outputs(out))
    assert_identical(*runs, count=1)


def test_sequential_i2v_is_identical_across_runs(red_circle, tmp_path):
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        result = CliRunner().invoke(app, ["i2v", str(red_circle), *FAST, "--seed", "5", "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs.append(png_outputs(out))
    assert_identical(*runs, count=1)


def test_asyncdiff_on_two_processes_is_identical_across_runs(prompts, tmp_path):
    # --warmup 1 < --steps 3: the stages really run asynchronously, on stale inputs, and still repeat exactly.
    # --cost flops: the default split from measured unit times can differ between runs, and the split decides
    # which inputs are stale (docs/ERRORS.md).
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        result = CliRunner().invoke(app, ["generate", str(prompts), *FAST, "--steps", "3", "--sampler", "asyncdiff",
                                          "--devices", "2", "--warmup", "1", "--cost", "flops", "--out", str(out)])
        assert result.exit_code == 0, result.output
        runs.append(png_outputs(out))
    assert_identical(*runs, count=1)


SAMPLE_PROMPTS = Path(__file__).resolve().parent.parent / "samples" / "prompt.txt"


def _files(out: Path) -> dict[str, bytes]:
    """Every file under `out` (videos, frame folders), by path, except the sidecars' timings-bearing JSON."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.suffix != ".json"}


@pytest.mark.parametrize("fmt", ["mp4", "gif"])
def test_two_fresh_runs_at_the_defaults_write_the_same_bytes(fmt, tmp_path):
    """The README's quick start, twice, in fresh processes: the same bytes in every format. MP4 at the CLI's full
    defaults (the sample prompt file, 25 steps), where x264's threads made the files differ; GIF on the first prompt
    at 2 steps (its writer has no threads, and the samples' determinism is the MP4 case's: this keeps the suite
    short). PNG's is test_sequential_generate_is_identical_across_processes's (fresh processes, PNG bytes)."""
    prompts, fast = SAMPLE_PROMPTS, []
    if fmt != "mp4":
        prompts, fast = tmp_path / "first.txt", ["--steps", "2"]
        first = next(line for line in SAMPLE_PROMPTS.read_text().splitlines() if line.strip() and line[0] != "#")
        prompts.write_text(first + "\n")
    runs = []
    for i in range(2):
        out = tmp_path / f"run{i}"
        command = [*asyncvid_command(), "generate", str(prompts), "--format", fmt, *fast, "--out", str(out)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr
        runs.append(_files(out))
    assert runs[0] and runs[0].keys() == runs[1].keys()
    differing = [name for name in runs[0] if runs[0][name] != runs[1][name]]
    assert not differing, f"{len(differing)} files differ, e.g. {differing[0]}" + _why(tmp_path, differing[0])


def _why(tmp_path: Path, name: str) -> str:
    """For a differing MP4, whether the sampled frames or only the encoding differ (the sidecar-free check)."""
    if not name.endswith(".mp4"):
        return ""
    import av

    decoded = []
    for i in range(2):
        with av.open(str(tmp_path / f"run{i}" / name)) as container:
            decoded.append(np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]))
    if decoded[0].shape != decoded[1].shape:
        return f" (decoded shapes {decoded[0].shape} and {decoded[1].shape})"
    gap = np.abs(decoded[0].astype(int) - decoded[1].astype(int))
    frames = sorted({int(f) for f in np.nonzero(gap.reshape(len(gap), -1).max(1))[0]})
    return f" (decoded pixels differ by up to {gap.max()} in frames {frames}: the samples or the encoder differ)"
