"""Data-parallel groups: the layout as one validated object, videos dealt to groups through the CLI, the pool, the
notebook API and two torchrun agents, the same bytes per video whatever the layout, and --parallel auto's choice."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import asyncvid
from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.cli.app import app
from asyncvid.errors import UsageError
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime.auto import candidates, loop_seconds
from asyncvid.runtime.layout import RankLayout
from asyncvid.runtime.loaders import ModelSpec
from asyncvid.runtime.pool import WorkerPool

FAST = ["--steps", "2", "--frames", "4", "--format", "png"]
CORES = len(os.sched_getaffinity(0))
PROMPTS = "a red circle moving left\na blue square moving up\na green triangle moving right\n"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def outputs(out: Path) -> dict[str, list[bytes]]:
    """Each video's PNG frames' bytes, by name."""
    return {p.name: [f.read_bytes() for f in sorted(p.glob("*.png"))] for p in sorted(out.iterdir()) if p.is_dir()}


def sidecars(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json"))}


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text(PROMPTS)
    return path


@pytest.fixture(scope="module")
def sequential(prompts, tmp_path_factory) -> Path:
    """The batch made sequentially in one process with one thread: the bytes every layout must give."""
    out = tmp_path_factory.mktemp("sequential")
    result = invoke("generate", prompts, *FAST, "--threads", "1", "--out", out)
    assert result.exit_code == 0, result.output
    return out


# --- the layout ----------------------------------------------------------------------------------------------------

def test_the_layout_multiplies_its_factors_and_names_each_in_errors():
    config = AsyncDiffConfig(stages=3, stride=2, cfg_parallel=True)
    layout = RankLayout.of(config, 2)
    assert layout.group_size == 8 and layout.world_size == 16
    assert layout.formula() == "data-parallel 2 x (stages 3 + stride 2 - 1) 4 x cfg-parallel 2 = 16"
    with pytest.raises(UsageError, match=r"needs data-parallel 2 x \(stages 3 \+ stride 2 - 1\) 4 x cfg-parallel 2 "
                                         r"= 16 processes, but 12 were asked for \(--devices\); use --devices 16"):
        layout.check_world_size(12)
    with pytest.raises(UsageError, match="the launcher started 4; launch 16"):
        layout.check_world_size(4, launched=True)
    assert RankLayout.of(None, 3).world_size == 3
    assert RankLayout.of(ParaTAAConfig(), 2, 6).group_size == 3
    with pytest.raises(UsageError, match="data-parallel must be an integer of at least 1, got 0"):
        RankLayout.of(None, 0)


def test_groups_are_consecutive_ranks_and_videos_are_dealt_in_turn():
    layout = RankLayout(3, 2)
    assert [layout.ranks_of(g) for g in range(3)] == [[0, 1], [2, 3], [4, 5]]
    assert [layout.group_of(r) for r in range(6)] == [0, 0, 1, 1, 2, 2]
    assert layout.leaders() == [0, 2, 4]
    assert layout.deal(7) == [0, 1, 2, 0, 1, 2, 0]


@pytest.mark.parametrize("args, match", [
    (["--data-parallel", "0"], "--data-parallel must be at least 1, got 0"),
    (["--data-parallel", "2", "--devices", "3"], r"needs data-parallel 2 x sequential 1 = 2 processes, but 3"),
    (["--data-parallel", "2", "--sampler", "asyncdiff", "--devices", "2"],
     r"data-parallel 2 x \(stages 2 \+ stride 1 - 1\) 2 = 4 processes, but 2"),
    (["--parallel", "auto", "--data-parallel", "2"], "chooses --data-parallel itself"),
    (["--parallel", "auto", "--sampler", "parataa"], "chooses the sampler itself, got --sampler parataa"),
    (["--data-parallel", str(CORES + 1)], rf"= {CORES + 1} processes, but there are {CORES} CPU cores here; use "
                                          rf"--data-parallel {CORES} or fewer \(or --oversubscribe\)"),
    (["--devices", "2"], "--data-parallel 2 for 2 videos at once"),
])
def test_bad_layouts_fail_in_one_line_with_exit_2_and_write_nothing(prompts, tmp_path, args, match):
    result = invoke("generate", prompts, *FAST, *args, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1
    assert __import__("re").search(match, result.output), result.output
    assert not (tmp_path / "out").exists()


# --- the same bytes whatever the layout ----------------------------------------------------------------------------

@pytest.mark.slow
def test_two_sequential_groups_write_what_one_process_writes_and_record_the_layout(prompts, sequential, tmp_path):
    result = invoke("generate", prompts, *FAST, "--data-parallel", "2", "--threads", "1", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert outputs(tmp_path) == outputs(sequential)
    layouts = {name: meta["layout"] for name, meta in sidecars(tmp_path).items()}
    assert {layout["group"] for layout in layouts.values()} == {0, 1}  # each idle group takes the next video
    assert all(layout["data_parallel"] == 2 and layout["group_size"] == 1 for layout in layouts.values())
    assert "group 1;" in result.output and "videos/h" in result.output
    # Resume works across layouts: the layout is recorded but does not change the settings, so all are skipped.
    again = invoke("generate", prompts, *FAST, "--threads", "1", "--out", tmp_path)
    assert again.exit_code == 0 and again.output.count("skipped") == 3, again.output


ASYNCDIFF = ["--steps", "3", "--sampler", "asyncdiff", "--warmup", "1", "--cost", "flops"]


@pytest.mark.slow
@pytest.mark.parametrize("sampler, group", [
    (ASYNCDIFF, 2),  # --warmup 1 < --steps: stale activations, so each group's own process group really matters
    # The guidance halves' groups, made for every data-parallel group (one stage: 4 ranks for the two groups, not 8).
    ([*ASYNCDIFF, "--cfg-parallel", "--stages", "1"], 2),
    (["--steps", "4", "--sampler", "parataa"], 2),
], ids=["asyncdiff", "cfg-parallel", "parataa"])
def test_two_groups_of_a_parallel_sampler_write_what_one_group_writes(prompts, tmp_path, sampler, group):
    common = [*FAST, *sampler, "--threads", "1", "--oversubscribe"]
    one = invoke("generate", prompts, *common, "--devices", group, "--out", tmp_path / "one")
    assert one.exit_code == 0, one.output
    two = invoke("generate", prompts, *common, "--devices", 2 * group, "--data-parallel", "2", "--out", tmp_path / "two")
    assert two.exit_code == 0, two.output
    assert outputs(tmp_path / "two") == outputs(tmp_path / "one")
    assert {m["layout"]["group_size"] for m in sidecars(tmp_path / "two").values()} == {group}


# --- the pool and the notebook API ---------------------------------------------------------------------------------

def request(prompt="a red circle moving left", **kw):
    return TextToVideo(prompt, **{"num_frames": 4, "height": 64, "width": 64, "num_inference_steps": 2, **kw})


@pytest.mark.slow
def test_a_failing_video_loses_none_of_the_others_and_the_groups_go_on():
    # The second fails on its rank (a text-to-video model given an image), as a video that cannot be made would.
    requests = [request(seed=0), ImageToVideo("missing.png", num_inference_steps=2), request(seed=1), request(seed=2)]
    with WorkerPool(ModelSpec("tiny-animatediff"), 2, torch.device("cpu"), threads=1,
                    layout=RankLayout(2, 1)) as pool:
        results = {index: (group, result) for index, group, result in pool.imap(requests)}
        assert sorted(results) == [0, 1, 2, 3]
        assert isinstance(results[1][1], UsageError) and "does text-to-video" in str(results[1][1])
        assert all(results[i][1].num_frames == 4 for i in (0, 2, 3))
        assert {group for group, _ in results.values()} == {0, 1}
        assert pool.generate(request(seed=3)).num_frames == 4  # still in step


@pytest.mark.slow
def test_the_notebook_api_takes_a_list_and_returns_the_videos_in_order():
    prompts = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"]
    kwargs = dict(num_frames=4, height=64, width=64, num_inference_steps=2, seed=4)
    with asyncvid.load("tiny-animatediff", threads=1) as alone:
        expected = [alone.text_to_video(p, **kwargs) for p in prompts]
    with asyncvid.load("tiny-animatediff", data_parallel=2, threads=1) as groups:
        assert len(groups.worker_pids) == 2
        videos = groups.text_to_video(prompts, **kwargs)
    assert [v.metadata["prompt"] for v in videos] == prompts
    assert all((v.frames == e.frames).all() for v, e in zip(videos, expected))
    assert {v.metadata["layout"]["group"] for v in videos} == {0, 1}


# --- torchrun across two machines ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_torchrun_agents_each_a_group_write_every_video_once_on_node_0(prompts, sequential, tmp_path):
    script = shutil.which("asyncvid") or str(Path(sys.executable).parent / "asyncvid")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outs = [tmp_path / "node0", tmp_path / "node1"]  # each node's own disk; node 1's must stay empty
    agents = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port),
             script, "generate", str(prompts), *FAST, "--data-parallel", "2", "--threads", "1",
             "--out", str(outs[node])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for node in (0, 1)
    ]
    logs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], logs
    # Rank 0 writes every video, node 1's group sends its own: nothing lands on node 1's disk.
    assert outputs(outs[0]) == outputs(sequential)
    assert not outs[1].exists(), logs
    assert "group 1;" in logs[0] and "wrote" not in logs[1], logs


# --- --parallel auto -----------------------------------------------------------------------------------------------

UNITS = [1.0, 2.0, 3.0, 1.0, 1.0]  # seconds per unit at one thread; 2 stages balance at 3 | 5


def test_the_loop_takes_whole_steps_in_warm_up_then_the_slowest_stage():
    assert loop_seconds(UNITS, 1, 25, 3) == 25 * 8
    assert loop_seconds(UNITS, 2, 25, 3) == 3 * 8 + 22 * 5


def test_auto_picks_groups_for_a_batch_and_the_fastest_video_for_one():
    def on_cpu(exponent):  # threads speed a unit up as threads ** exponent
        return lambda threads: [u * threads ** -exponent for u in UNITS]

    best = candidates(on_cpu(0.6), 2, 8, 25, 3, cpu=True)[0]
    assert (best.data_parallel, best.stages, best.threads) == (2, 1, 1)
    best = candidates(on_cpu(0.3), 2, 1, 25, 3, cpu=True)[0]  # one video: the lowest latency, AsyncDiff here
    assert (best.data_parallel, best.stages, best.threads) == (1, 2, 1)
    best = candidates(on_cpu(0.9), 2, 1, 25, 3, cpu=True)[0]  # threads that scale well beat two stages
    assert (best.data_parallel, best.stages, best.threads) == (1, 1, 2)
    gpus = candidates(lambda threads: UNITS, 8, 100, 25, 3, cpu=False)
    assert (gpus[0].data_parallel, gpus[0].stages, gpus[0].threads) == (8, 1, None)
    assert gpus[0].batch_s == 13 * 25 * 8 and all(c.processes <= 8 for c in gpus)
    assert candidates(lambda threads: UNITS, 8, 1, 25, 3, cpu=False)[0].stages > 1


@pytest.mark.slow
def test_parallel_auto_runs_the_batch_with_the_layout_it_names(prompts, tmp_path):
    result = invoke("generate", prompts, *FAST, "--parallel", "auto", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if line.startswith("parallel auto: "))
    assert "predicted" in line and "for 3 videos" in line
    assert len(outputs(tmp_path)) == 3
