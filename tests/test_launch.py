"""Local worker processes (asyncvid.runtime.launch.run): forked from a server that has imported torch and diffusers,
they still see the caller's environment of the moment, and none outlives the process that started it."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from test_pool import wait_gone

from asyncvid.runtime import launch

CPU = torch.device("cpu")


def _rank_1s(rank, name):
    """Rank 1's (parent pid, environment variable `name`), on rank 0 (this process) too."""
    box = [(os.getppid(), os.environ.get(name))]
    dist.broadcast_object_list(box, src=1)
    return box[0]


@pytest.mark.skipif(sys.platform != "linux", reason="ranks are forked by a server on Linux only")
def test_ranks_are_forked_by_the_server_while_the_environment_is_unchanged():
    parent, _ = launch.run(_rank_1s, 2, CPU, "ASYNCVID_PROBE", threads=1, oversubscribe=True)
    assert parent != os.getpid()  # the fork server's child, not this process's


def test_ranks_are_spawned_where_the_server_holds_other_copies_of_the_libraries(monkeypatch):
    """The fork server imports PRELOAD with a fresh interpreter's sys.path: where that finds another diffusers than
    this process's (a development copy ahead on sys.path), the ranks are spawned and import this one."""
    launch.run(_rank_1s, 2, CPU, "ASYNCVID_PROBE", threads=1, oversubscribe=True)  # the server runs from here on
    monkeypatch.setitem(launch._server["modules"], "diffusers", "/elsewhere/diffusers/__init__.py")
    parent, _ = launch.run(_rank_1s, 2, CPU, "ASYNCVID_PROBE", threads=1, oversubscribe=True)
    assert parent == os.getpid()


def test_a_rank_sees_the_callers_environment_of_the_moment(monkeypatch):
    """A variable set after the fork server started reaches the ranks: they are spawned by this process then."""
    launch.run(_rank_1s, 2, CPU, "ASYNCVID_PROBE", threads=1, oversubscribe=True)  # the server runs from here on
    monkeypatch.setenv("ASYNCVID_PROBE", "set later")
    parent, seen = launch.run(_rank_1s, 2, CPU, "ASYNCVID_PROBE", threads=1, oversubscribe=True)
    assert seen == "set later" and parent == os.getpid()


def test_no_rank_outlives_a_killed_launcher(tmp_path):
    """The launcher SIGKILLed while its forked rank computes: the fork server exits with it, and so does the rank."""
    (tmp_path / "killed.py").write_text(textwrap.dedent("""
        import os, signal, time
        import torch
        import torch.distributed as dist
        from asyncvid.runtime import launch

        def report(rank):
            box = [(os.getpid(), os.getppid())]
            dist.broadcast_object_list(box, src=1)
            if rank.rank == 0:
                print(*box[0], os.getpid(), flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)

        if __name__ == "__main__":
            launch.run(report, 2, torch.device("cpu"), threads=1, oversubscribe=True)
    """))
    run = subprocess.run([sys.executable, "killed.py"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]
    rank_1, its_parent, launcher = (int(pid) for pid in run.stdout.split())
    assert its_parent != launcher  # the fork server, which has gone too
    assert wait_gone([rank_1, its_parent], 5) == []
