"""The CLI on real processes when things go wrong: a rank killed mid-generation, Ctrl-C. Nothing may be left behind."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
# Long enough per video (many steps) that a signal sent after the first video lands in the middle of the second.
ARGS = ["--steps", "20", "--frames", "4", "--height", "64", "--width", "64", "--format", "png", "--threads", "1"]
PARALLEL = ["--sampler", "asyncdiff", "--devices", "2", "--warmup", "2", "--cost", "flops", "--oversubscribe"]


def cli() -> str:
    return shutil.which("asyncvid") or str(Path(sys.executable).parent / "asyncvid")


def children(pid: int) -> list[int]:
    """Live worker processes started by `pid` (spawned, or forked: then with the CLI's own command line), oldest
    first."""
    found = []
    parent = (Path("/proc") / str(pid) / "cmdline").read_bytes()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat[1]) == pid and stat[0] != "Z" and (b"spawn_main" in cmdline or cmdline == parent):
            found.append((int(stat[19]), int(entry.name)))  # field 22: start time
    return [p for _, p in sorted(found)]


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(prompts: Path, out: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([cli(), "generate", str(prompts), *ARGS, *extra, "--out", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_video(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # "wrote <path> (...)": the first video is done, the second has started
    assert line.startswith("wrote "), (line, proc.stderr.read() if proc.poll() is not None else "")
    return line


def assert_nothing_half_written(out: Path) -> None:
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000-a-red-circle", "000-a-red-circle.json"], names  # the first video stays; nothing else


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\na green triangle\n")
    return path


def test_a_rank_killed_mid_generation_ends_every_process_and_names_it(prompts, tmp_path):
    out = tmp_path / "out"
    proc = start(prompts, out, *PARALLEL)
    try:
        wait_for_first_video(proc)
        workers = children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)
        killed = time.monotonic()
        proc.wait(timeout=30)
        assert time.monotonic() - killed < 30
    finally:
        proc.kill()
    stderr = proc.stderr.read()
    assert proc.returncode == 1, stderr
    assert "error: rank 1 failed (killed by SIGKILL); stopped all 2 ranks" in stderr
    assert [w for w in workers if alive(w)] == []
    assert_nothing_half_written(out)


@pytest.mark.parametrize("parallel", [True, False], ids=["asyncdiff-2-ranks", "sequential"])
def test_ctrl_c_ends_the_workers_within_5_s_with_exit_code_130(parallel, prompts, tmp_path):
    out = tmp_path / "out"
    proc = start(prompts, out, *(PARALLEL if parallel else []))
    try:
        wait_for_first_video(proc)
        workers = children(proc.pid)
        assert len(workers) == (2 if parallel else 0), workers
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        proc.wait(timeout=5)
        gone = time.monotonic() - sent
    finally:
        proc.kill()
    assert proc.returncode == 130, proc.stderr.read()
    assert gone < 5
    assert [w for w in workers if alive(w)] == []
    assert_nothing_half_written(out)
