"""What a GPU run needs that the CPU runs cannot show: one GPU per rank, `cuda:N` honoured, headers that carry the
sender's dtype, planning timed in the run's dtype, and timers that see queued GPU work (that one needs CUDA)."""

import pytest
import torch

from asyncvid.asyncdiff.hook import _header, _parse_header
from asyncvid.errors import UsageError
from asyncvid.runtime.launch import rank_device


def test_two_ranks_on_one_gpu_are_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UsageError, match=r"2 processes on this machine but 1 GPU\(s\) visible: NCCL needs one GPU"):
        rank_device(1, torch.device("cuda"), local_world=2)
    with pytest.raises(UsageError):  # rank 0 refuses as well, so no rank waits in a collective for the others
        rank_device(0, torch.device("cuda"), local_world=2)


def test_each_local_rank_gets_its_own_gpu_and_one_process_gets_the_gpu_asked_for(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [rank_device(r, torch.device("cuda"), local_world=4) for r in range(4)] == \
        [torch.device("cuda", r) for r in range(4)]
    assert rank_device(0, torch.device("cuda:3"), local_world=1) == torch.device("cuda:3")
    assert rank_device(0, torch.device("cpu"), local_world=2) == torch.device("cpu")


def test_a_launcher_that_shows_each_rank_one_gpu_is_trusted(monkeypatch):
    """srun --gpus-per-task=1 and the like set CUDA_VISIBLE_DEVICES per rank and no LOCAL_WORLD_SIZE: each rank
    sees one GPU, its own. Where ranks outnumber several visible GPUs, two would share one: refused."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device(3, torch.device("cuda"), local_world=None) == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UsageError, match="local rank 3 but 2 GPUs visible"):
        rank_device(3, torch.device("cuda"), local_world=None)


def test_a_launcher_with_the_wrong_process_count_is_told_to_launch_more():
    from asyncvid.asyncdiff.config import AsyncDiffConfig

    with pytest.raises(UsageError, match=r"launch 2 processes \(torchrun --nproc-per-node 2\)"):
        AsyncDiffConfig(stages=2).check_world_size(3, launched=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_exchange_headers_carry_the_senders_dtype_and_shape(dtype):
    tensor = torch.zeros(2, 3, 4, 5, dtype=dtype)
    assert _parse_header(_header(tensor)) == (tensor.shape, dtype)


def test_measured_plan_costs_are_timed_in_the_runs_dtype(monkeypatch):
    import asyncvid.asyncdiff.setup
    from asyncvid.runtime.loaders import describe_plan

    seen = []

    def fake_measure(unet, family, shape, device, dtype):
        seen.append(dtype)
        return [1.0] * len(family.build_program(unet).units)

    monkeypatch.setattr(asyncvid.asyncdiff.setup, "measure_unit_costs", fake_measure)
    describe_plan("tiny-svd", 2, cost="measured", device="cpu", dtype="bfloat16", frames=2, height=64, width=64)
    describe_plan("tiny-svd", 2, cost="measured", device="cpu", frames=2, height=64, width=64)
    assert seen == [torch.bfloat16, torch.float32]  # float32 is what a CPU run uses by default


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stopwatch_sees_queued_gpu_work():
    from asyncvid.models.devices import Stopwatch

    watch = Stopwatch(torch.device("cuda"))
    start = watch.start()
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time; the host returns at once
    watch.stop(start)
    assert watch.seconds > 0.02


def test_the_declared_torch_floor_has_the_collectives_the_hook_calls():
    """`group_src`/`group_peer` (broadcast, P2POp) arrived in torch 2.6: an older torch that pip accepted would fail
    on the first AsyncDiff step, so the dependency must not allow it."""
    import re
    import tomllib
    from pathlib import Path

    project = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    floor = next(re.fullmatch(r"torch>=([\d.]+)", d.split(";")[0].strip()) for d in project["dependencies"]
                 if d.startswith("torch"))
    assert floor is not None and tuple(int(p) for p in floor.group(1).split(".")[:2]) >= (2, 6)
