"""AsyncDiff through the CLI and under torchrun, its validation on every rank, and removing its hook."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.hook import HOOK_NAME, apply_asyncdiff, remove_asyncdiff
from asyncvid.asyncdiff.plan import make_plan
from asyncvid.cli.app import app
from asyncvid.pipelines import load_pipeline, unet_inputs
from asyncvid.runtime import launch
from asyncvid.video.writers import read_png_frames

pytestmark = pytest.mark.slow
FAST = ["--steps", "3", "--frames", "4", "--format", "png"]
EXACT = ["--sampler", "asyncdiff", "--devices", "2", "--warmup", "3"]  # warm-up = steps: exact


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def frames_of(out: Path) -> dict[str, np.ndarray]:
    return {p.name: read_png_frames(p) for p in sorted(out.iterdir()) if p.is_dir()}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle moving left\na blue square moving up\n")
    return path


@pytest.fixture(scope="module")
def sequential_png(prompts, tmp_path_factory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("sequential")
    result = invoke("generate", prompts, *FAST, "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return frames_of(out)


def test_generate_with_asyncdiff_matches_sequential_when_warmup_covers_all_steps(prompts, sequential_png, tmp_path):
    result = invoke("generate", prompts, *FAST, *EXACT, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    parallel = frames_of(tmp_path)
    assert parallel.keys() == sequential_png.keys() and len(parallel) == 2
    for name, frames in parallel.items():
        assert np.array_equal(frames, sequential_png[name]), name


def test_i2v_with_asyncdiff_writes_the_video(red_circle, tmp_path):
    result = invoke("i2v", red_circle, "--steps", "5", "--frames", "4", "--sampler", "asyncdiff", "--devices", "2",
                    "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "000-red-circle.mp4").is_file()
    assert '"name": "asyncdiff"' in (tmp_path / "000-red-circle.json").read_text()


def test_layout_mismatch_is_refused_before_any_process_starts(prompts, tmp_path):
    result = invoke("generate", prompts, *FAST, "--sampler", "asyncdiff", "--devices", "3", "--stages", "2",
                    "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "error: AsyncDiff needs stages + stride - 1 = 2 + 1 - 1 = 2 processes, but 3 were started; use --devices 2 "
        "or change --stages or --stride"
    ]
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_bad_split_fails_on_every_rank_with_one_line(prompts, tmp_path):
    result = invoke("generate", prompts, *FAST, *EXACT, "--split", "down_blocks.9.resnets.0", "--out", tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown unit 'down_blocks.9.resnets.0'" in lines[0], result.stderr
    assert not any(tmp_path.iterdir())


def _hook_roundtrip(rank):
    """In a one-rank group: outputs before, with a one-stage hook, and after removing it."""
    pipe, _, _ = load_pipeline("tiny-svd", device=torch.device("cpu"), dtype=torch.float32)
    unet = pipe.unet
    args, kwargs = unet_inputs.SVD.example_inputs(unet, frames=4, height=64, width=64)
    with torch.inference_mode():
        before = unet(*args, **kwargs).sample
        program = unet_inputs.SVD.build_program(unet)
        plan = make_plan(program.names, [1.0] * len(program.units), 1)
        apply_asyncdiff(unet, program, plan, AsyncDiffConfig(stages=1, warmup=1), pipe.scheduler)
        hooked = unet(*args, **kwargs).sample
        remove_asyncdiff(unet)
        after = unet(*args, **kwargs).sample
    return before, hooked, after, HOOK_NAME in unet._diffusers_hook.hooks


def test_removing_the_hook_restores_the_unet_bit_for_bit():
    before, hooked, after, still_registered = launch.run(_hook_roundtrip, 1, torch.device("cpu"), threads=1)
    assert torch.equal(hooked, before)
    assert torch.equal(after, before)
    assert not still_registered


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_agents_on_localhost_match_sequential(prompts, sequential_png, tmp_path):
    script = shutil.which("asyncvid") or str(Path(sys.executable).parent / "asyncvid")
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             script, "generate", str(prompts), *FAST, *EXACT[:2], "--warmup", "3", "--threads", "1",
             "--out", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )
        for node in (0, 1)
    ]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], outputs
    parallel = frames_of(tmp_path)
    assert parallel.keys() == sequential_png.keys()
    for name, frames in parallel.items():
        assert np.array_equal(frames, sequential_png[name]), name
    assert "wrote" in outputs[0] and "wrote" not in outputs[1]  # only rank 0 writes and prints
