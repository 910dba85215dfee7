"""The worker pool on real processes (gloo, 2 ranks): load once, sample many, end cleanly, fail loudly."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.requests import TextToVideo
from asyncvid.runtime.loaders import ModelSpec
from asyncvid.runtime.pool import RankFailed, WorkerPool

pytestmark = pytest.mark.slow
CPU = torch.device("cpu")
SPEC = ModelSpec("tiny-animatediff", AsyncDiffConfig(stages=2, warmup=2, cost="flops"), plan_shape=(4, 64, 64))


def request(steps=2, seed=0, prompt="a red circle moving left"):
    return TextToVideo(prompt, num_frames=4, height=64, width=64, num_inference_steps=steps, seed=seed)


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids, seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.fixture(scope="module")
def pool():
    start = time.perf_counter()
    pool = WorkerPool(SPEC, 2, CPU, threads=1, oversubscribe=True)
    pool.load_wall_s = time.perf_counter() - start
    yield pool
    pool.close()


def test_calls_reuse_the_loaded_workers_and_are_much_faster_than_loading(pool):
    pids = pool.pids
    timings = []
    videos = []
    for seed in (0, 1, 0):
        start = time.perf_counter()
        videos.append(pool.generate(request(seed=seed)))
        timings.append(time.perf_counter() - start)
    assert pool.pids == pids and all(alive(p) for p in pids)
    assert [w["pid"] for w in pool.workers] == pids  # the processes that loaded are the ones that sampled
    assert pool.calls == 3
    # Loading takes seconds per rank; a call on loaded ranks a fraction of that.
    assert max(timings[1:]) < 0.5 * pool.load_wall_s, (timings, pool.load_wall_s)
    assert np.array_equal(videos[0].frames, videos[2].frames)
    assert not np.array_equal(videos[0].frames, videos[1].frames)
    assert videos[0].metadata["sampler"]["devices"] == 2


def test_a_bad_request_fails_alone_and_the_pool_goes_on(pool):
    from asyncvid.errors import UsageError
    from asyncvid.requests import ImageToVideo

    with pytest.raises(UsageError, match="does text-to-video"):
        pool.generate(ImageToVideo("missing.png", num_inference_steps=2))
    assert pool.generate(request()).num_frames == 4


def test_close_ends_every_worker_and_is_idempotent(pool):
    pids = pool.pids
    pool.close()
    pool.close()
    assert wait_gone(pids, 5) == []
    with pytest.raises(RuntimeError, match="closed"):
        pool.generate(request())


def test_a_worker_killed_mid_generation_raises_naming_its_rank_and_leaves_no_process():
    pool = WorkerPool(SPEC, 2, CPU, threads=1, oversubscribe=True)
    pids = pool.pids
    killed = []

    def kill_rank_1(done, total, note=""):
        if not killed:
            os.kill(pids[1], signal.SIGKILL)
            killed.append(time.monotonic())

    with pytest.raises(RankFailed, match=r"rank 1 failed \(killed by SIGKILL\); stopped all 2 ranks"):
        pool.generate(request(steps=30), on_step=kill_rank_1)
    assert killed and time.monotonic() - killed[0] < 30
    assert pool.closed
    assert wait_gone(pids, 5) == []
    pool.close()  # still safe


def test_a_stuck_rank_ends_the_call_after_the_collective_timeout(monkeypatch):
    """SIGSTOP: the rank is alive but silent; its peer's collective times out and the pool names the silent rank."""
    monkeypatch.setenv("ASYNCVID_COLLECTIVE_TIMEOUT", "15")  # read by the workers when they start
    pool = WorkerPool(SPEC, 2, CPU, threads=1, oversubscribe=True)
    pids = pool.pids
    stopped = []

    def stop_rank_1(done, total, note=""):
        if not stopped:
            os.kill(pids[1], signal.SIGSTOP)
            stopped.append(time.monotonic())

    try:
        with pytest.raises(RankFailed, match=r"rank 1 failed \(stopped answering; rank 0 failed: .*Timed out"):
            pool.generate(request(steps=30), on_step=stop_rank_1)
        assert time.monotonic() - stopped[0] < 15 + 5 + 15  # the timeout, the pool's grace for the others, slack
        assert wait_gone(pids, 5) == []
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("ending", ["sigkill"])  # a plain exit: the quickstart notebook's kernel, in test_api
def test_no_worker_outlives_its_interpreter(ending, tmp_path):
    """Interpreter exit without close() (atexit finalizer), and a parent killed outright (workers watch it)."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        import asyncvid

        if __name__ == "__main__":
            pipe = asyncvid.load("tiny-animatediff", devices=2, threads=1, oversubscribe=True,
                                 sampler=asyncvid.AsyncDiffConfig(stages=2, cost="flops"))
            print(*pipe.worker_pids, flush=True)
            if {ending!r} == "sigkill":
                os.kill(os.getpid(), signal.SIGKILL)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == (-signal.SIGKILL if ending == "sigkill" else 0), run.stderr[-3000:]
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 2
    assert wait_gone(pids, 5) == []
