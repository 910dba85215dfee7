"""SVD-xt at its published size (1.5B-parameter UNet, random float16 weights in the fp16-only form users download), at
a tiny resolution: AsyncDiff at warm-up = steps equals sequential sampling, and `asyncvid plan --cost measured` at the
model's default shape (25 frames, 576x1024) stays within 2 minutes and 2 GB, then reuses its cached times."""

import subprocess
import sys
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from asyncvid.bench.checkpoints import build
from asyncvid.cli.app import app
from asyncvid.video.writers import read_png_frames

pytestmark = pytest.mark.slow
GB = 1024**3
# The CLI in a fresh process that reports its own peak resident memory: VmHWM, which starts afresh at exec (ru_maxrss
# keeps the forking pytest process's figure).
PEAK = ("import sys\nfrom asyncvid.bench.memory import resident\nfrom asyncvid.cli.app import app\n"
        "try:\n    app(sys.argv[1:])\nexcept SystemExit as exit:\n    code = exit.code\n"
        "print('peak', resident()['VmHWM'], file=sys.stderr)\nsys.exit(code)\n")


@pytest.fixture(scope="module")
def svd_xt(tmp_path_factory):
    return build("svd-xt", tmp_path_factory.mktemp("full"), form="fp16", scale="full", hub_cache=False)


def cli_peak(*args) -> tuple[subprocess.CompletedProcess, int, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK, *map(str, args)], capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("peak ")))
    return done, peak, seconds


def test_plan_measured_at_the_default_shape_is_bounded_and_cached(svd_xt):
    done, peak, seconds = cli_peak("plan", "--model", svd_xt, "--cost", "measured")
    assert done.returncode == 0, done.stderr
    assert "UNetSpatioTemporalConditionModel" in done.stdout and "balanced by measured" in done.stdout
    assert seconds < 120 and peak < 2 * GB, f"{seconds:.0f} s, {peak / GB:.2f} GB"
    again, cached_peak, _ = cli_peak("plan", "--model", svd_xt, "--cost", "measured")
    assert again.stdout == done.stdout  # the same times: from the cache
    assert cached_peak < peak - 0.4 * GB, f"{cached_peak / GB:.2f} GB with the cache, {peak / GB:.2f} GB without"


def test_asyncdiff_at_warmup_equal_to_steps_equals_sequential(svd_xt, red_circle, tmp_path):
    common = ["i2v", red_circle, "--model", svd_xt, "--steps", "2", "--frames", "4", "--height", "64", "--width",
              "64", "--format", "png", "--threads", "1"]
    for name, extra in (("sequential", []), ("asyncdiff", ["--sampler", "asyncdiff", "--devices", "2", "--warmup",
                                                            "2"])):
        result = CliRunner().invoke(app, [str(a) for a in (*common, *extra, "--out", tmp_path / name)])
        assert result.exit_code == 0, result.output
    frames = {name: read_png_frames(next(p for p in (tmp_path / name).iterdir() if p.is_dir()))
              for name in ("sequential", "asyncdiff")}
    assert frames["sequential"].std() > 1  # a picture, not a constant
    np.testing.assert_array_equal(frames["asyncdiff"], frames["sequential"])
