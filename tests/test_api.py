"""asyncvid.load and its VideoPipeline: argument checks, in-process sampling, and the quickstart notebook vs the CLI."""

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import asyncvid
from asyncvid import AsyncDiffConfig, UsageError
from asyncvid.api import _seed
from asyncvid.cli.app import app
from asyncvid.video.writers import read_png_frames

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
SIZE = dict(num_frames=4, height=64, width=64)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(devices=0), UsageError, "devices must be a whole number >= 1, got 0"),
    (dict(devices=2), UsageError, r"devices=2 needs a parallel sampler; pass sampler=AsyncDiffConfig\(stages=2\)"),
    (dict(devices=3, sampler=AsyncDiffConfig(stages=2)), UsageError, "AsyncDiff needs stages \\+ stride - 1"),
    (dict(sampler="asyncdiff"), TypeError, "sampler must be None \\(sequential\\) or one of AsyncDiffConfig.*, got str"),
    (dict(threads=0), UsageError, "threads must be a whole number >= 1 or None, got 0"),
    (dict(dtype="float16", device="cpu"), UsageError, "float16 is not supported on the CPU"),
])
def test_bad_load_arguments_fail_before_anything_loads(kwargs, error, match):
    with pytest.raises(error, match=match):
        asyncvid.load("tiny-animatediff", **kwargs)


def test_a_bad_model_on_several_devices_fails_before_any_worker_starts(tmp_path, monkeypatch):
    import asyncvid.runtime.pool

    def no_workers(*args, **kwargs):
        raise AssertionError("a worker pool was started for a model that cannot load")

    monkeypatch.setattr(asyncvid.runtime.pool, "WorkerPool", no_workers)
    with pytest.raises(UsageError, match=f"model '{tmp_path / 'missing'}' is not an embedded model"):
        asyncvid.load(str(tmp_path / "missing"), devices=2, sampler=AsyncDiffConfig(stages=2))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "model_index.json").write_text('{"_class_name": "AnimateDiffPipeline", "unet": ["x", "Y"]}')
    with pytest.raises(UsageError, match="component 'unet' .* comes from 'x'"):
        asyncvid.load(str(tmp_path / "bad"), devices=2, sampler=AsyncDiffConfig(stages=2))


def test_seed_comes_from_seed_or_an_unused_generator():
    assert _seed(None, None) == 0
    assert _seed(7, None) == 7
    assert _seed(None, torch.Generator().manual_seed(42)) == 42
    with pytest.raises(UsageError, match="pass seed or generator, not both"):
        _seed(1, torch.Generator().manual_seed(1))
    used = torch.Generator().manual_seed(3)
    torch.randn(2, generator=used)
    with pytest.raises(UsageError, match="generator has been used since it was seeded with 3; pass seed=3"):
        _seed(None, used)


@pytest.fixture(scope="module")
def t2v():
    with asyncvid.load("tiny-animatediff", threads=1) as pipe:
        yield pipe


def test_in_process_sampling_returns_a_video_and_generator_equals_seed(t2v):
    video = t2v.text_to_video("a red circle", num_inference_steps=2, seed=5, **SIZE)
    same = t2v.text_to_video("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(5), **SIZE)
    assert isinstance(video, asyncvid.Video) and video.frames.shape == (4, 64, 64, 3) and video.fps == 8
    assert np.array_equal(video.frames, same.frames)
    assert video.metadata["seed"] == 5 and video.metadata["sampler"] == {"name": "sequential"}
    assert t2v.worker_pids == [] and "in this process" in repr(t2v)


def test_the_wrong_task_and_bad_requests_are_usage_errors(t2v, tmp_path):
    with pytest.raises(UsageError, match="model 'tiny-animatediff' does text-to-video; call text_to_video instead"):
        t2v.image_to_video(SAMPLES / "red_circle.png", num_inference_steps=2)
    with pytest.raises(UsageError, match="does not exist"):
        t2v.image_to_video(tmp_path / "missing.png")
    with pytest.raises(UsageError, match="height must be a positive multiple of 8"):
        t2v.text_to_video("x", height=60)


def test_a_closed_pipeline_refuses_calls():
    pipe = asyncvid.load("tiny-animatediff", threads=1)
    pipe.close()
    pipe.close()
    assert "closed" in repr(pipe)
    with pytest.raises(RuntimeError, match="closed"):
        pipe.text_to_video("x", num_inference_steps=1, **SIZE)


# --- the quickstart notebook, run headless, against the CLI -------------------------------------------------------

PARALLEL = ["--sampler", "asyncdiff", "--devices", "2", "--warmup", "1", "--cost", "flops", "--oversubscribe"]
CLI_SIZE = ["--steps", "3", "--frames", "4", "--height", "64", "--width", "64", "--format", "png", "--seed", "0"]


def wait_gone(pids, seconds: float) -> list[int]:
    """The pids still alive (and not zombies) after up to `seconds`."""
    def alive(pid):
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


def _cli_frames(command: str, source: Path, out: Path, *extra) -> np.ndarray:
    result = CliRunner().invoke(app, [command, str(source), *CLI_SIZE, *extra, "--out", str(out)])
    assert result.exit_code == 0, result.output
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    return read_png_frames(folder)


@pytest.mark.slow
def test_quickstart_notebook_runs_and_its_videos_equal_the_clis(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    nb = nbformat.read(SAMPLES / "quickstart.ipynb", as_version=4)
    (params,) = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    params.source = (f"OUT = Path({str(tmp_path / 'nb')!r})\nSIZE = dict(num_frames=4, height=64, width=64)\n"
                     f"STEPS = 3\nDEVICES = 2")
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(SAMPLES)}}).execute()

    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # The notebook closes one parallel pipeline and leaves the other to the kernel's exit: no worker may remain.
    workers = [int(p) for p in re.search(r"^workers ([\d ]+)$", outputs, re.M).group(1).split()]
    assert len(workers) == 4 and wait_gone(workers, 5) == []
    html = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "text/html" in o.get("data", {})]
    assert html and "data:video/mp4;base64," in html[0]["data"]["text/html"]  # videos show inline

    prompt = tmp_path / "prompt.txt"
    prompt.write_text("a red circle moving left\n")
    image = SAMPLES / "red_circle.png"
    expected = {
        "t2v-sequential": _cli_frames("generate", prompt, tmp_path / "cli-t2v-seq"),
        "t2v-asyncdiff": _cli_frames("generate", prompt, tmp_path / "cli-t2v-par", *PARALLEL),
        "i2v-sequential": _cli_frames("i2v", image, tmp_path / "cli-i2v-seq"),
        "i2v-asyncdiff": _cli_frames("i2v", image, tmp_path / "cli-i2v-par", *PARALLEL),
    }
    for name, frames in expected.items():
        assert np.array_equal(read_png_frames(tmp_path / "nb" / name), frames), name
    # AsyncDiff with warm-up 1 is not sequential sampling: the comparison above would catch a silent fallback.
    assert not np.array_equal(expected["t2v-asyncdiff"], expected["t2v-sequential"])
