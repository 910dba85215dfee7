"""The GPU check (`python -m asyncvid.bench.gpu_check`): its checks run here on the CPU at tiny sizes in bfloat16, so
the code a GPU machine runs is exercised in every CI run; on a machine with CUDA, `pytest -m cuda` runs it whole."""

import json

import pytest
import torch

from asyncvid.bench import gpu_check

pytestmark = pytest.mark.slow


def test_the_gpu_checks_cpu_side_passes(tmp_path):
    code = gpu_check.main(["--device", "cpu", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["rows"]
    assert code == 0, [r for r in rows if not r["passed"]]
    checks = " | ".join(r["check"] for r in rows)
    for part in ("sequential bfloat16 vs float32", "warm-up = steps", "ParaTAA", "motion adapter"):
        assert part in checks
    assert "| check | model | value | floor | passed |" in (tmp_path / "gpu_check.md").read_text()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_check_passes_on_this_gpu(tmp_path):
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path)]) == 0
