"""The benchmark: PSNR and SSIM against known values, its settings' checks, the report made from a result, and a
tiny grid run end to end on real processes (2 steps)."""

import json

import numpy as np
import pytest

from asyncvid.bench.report import markdown
from asyncvid.bench.suite import BenchConfig, run_bench
from asyncvid.errors import UsageError
from asyncvid.eval.fidelity import K1, K2, PEAK, SIGMA, compare, psnr, ssim, ssim_map


def _gaussian_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM of one 11x11 window, written out from Wang et al. (2004), eq. 13, with Gaussian weights."""
    r = np.arange(11) - 5
    w = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * SIGMA**2))
    w /= w.sum()
    mx, my = (w * x).sum(), (w * y).sum()
    vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
    cxy = (w * (x - mx) * (y - my)).sum()
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def test_psnr_known_values():
    a = np.full((2, 8, 8, 3), 100, dtype=np.uint8)
    assert psnr(a, a) == float("inf")
    assert psnr(a, a + 1) == pytest.approx(20 * np.log10(255.0))  # MSE 1: 48.13 dB
    assert psnr(a, a + 10) == pytest.approx(20 * np.log10(255.0) - 20.0)


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (11, 11)).astype(np.float64)
    y = np.clip(x + rng.normal(0, 20, x.shape), 0, 255)
    assert ssim_map(x, y).shape == (1, 1, 1)  # one window position
    assert ssim(x, y) == pytest.approx(_gaussian_ssim(x, y), rel=1e-9)
    # Constant images: only the luminance term remains.
    a, b = np.full((16, 16, 3), 100.0), np.full((16, 16, 3), 120.0)
    c1 = (K1 * PEAK) ** 2
    assert ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1))
    img = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + rng.normal(0, 30, img.shape), 0, 255).astype(np.uint8)
    assert ssim(img, noisy) == pytest.approx(ssim(noisy, img))  # symmetric
    assert 0 < ssim(img, noisy) < 0.99
    assert ssim(img, 255 - img) < 0  # anti-correlated structure


def test_compare_averages_frames_and_checks_shapes():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, (3, 16, 16, 3)).astype(np.uint8)
    other = frames.copy()
    other[1] = np.clip(other[1].astype(int) + 1, 0, 255)
    result = compare(other, frames)
    assert result["ssim"] == pytest.approx(np.mean([ssim(a, b) for a, b in zip(other, frames)]))
    assert result["psnr_db"] == pytest.approx(psnr(other[1], frames[1]))  # identical frames have no finite PSNR
    assert compare(frames, frames)["psnr_db"] == float("inf")
    with pytest.raises(ValueError, match="differ in shape"):
        compare(frames[:2], frames)


@pytest.mark.parametrize("bad, match", [(dict(size=100), "multiple of 64"), (dict(repeats=0), "repeats"),
                                        (dict(warmups=(0,)), "warm-ups"), (dict(device="tpu"), "cpu or cuda"),
                                        (dict(steps=1), "steps must be")])
def test_config_checks_its_values(bad, match):
    with pytest.raises(UsageError, match=match):
        BenchConfig(**bad)


def _fake_result():
    row = dict(model="m", kind="asyncdiff", processes=2, threads_per_process=1, warmup=3, loop_s=1.0, end_to_end_s=1.2,
               speedup_vs_1_thread=1.5, speedup_vs_all_threads=1.1, end_to_end_speedup_vs_1_thread=1.4, psnr_db=40.0,
               ssim=0.99, peak_mib_per_rank=[400, 380], mib_sent_per_step_per_rank=[2.0, 0.0],
               weight_share_per_rank=[0.7, 0.3], busy_share_per_rank=[0.9, 0.8], parataa=None,
               predicted_loop_s=1.1, prediction_error=0.1, config="AsyncDiff N=2 S=1 warm-up 3")
    seq = {**row, "kind": "sequential", "processes": 1, "warmup": None, "psnr_db": None, "ssim": None,
           "predicted_loop_s": None, "prediction_error": None, "config": "sequential, 1 thread",
           "busy_share_per_rank": [], "peak_mib_per_rank": [400]}
    meta = dict(command="asyncvid bench", date="2026-11-22 06:20 UTC", machine="x86_64, 2 cores", gpu=None,
                device="cpu", torch="2", diffusers="0", asyncvid="0.1.0", load_average_before=0.5,
                load_average_after=1.0, seconds=600.0, config={"repeats": 3})
    link = dict(measured_on="cpu", sizes=[4, 2**20], latency_us=50.0, gb_per_s=1.5,
                used=dict(latency_us=50.0, gb_per_s=1.5))
    projection = [dict(stages=2, stride=s, devices=1 + s, step_ms=100.0, loop_s=1.0, speedup_vs_1_thread=1.5)
                  for s in (1, 2)]
    request = dict(task="text-to-video", num_frames=8, height=128, width=128, num_inference_steps=25, seed=0)
    full = [dict(model="SVD-xt", shape={}, source="FLOPs", stages=2, stride=1, devices=2, sequential_step_s=10.0,
                 step_s=5.5, speedup_per_step=1.8, max_weights_gib=2.2, mib_crossing_per_step=1300.0)]
    adherence = dict(model="tiny-animatediff", prompts_file="p.txt", steps=25, seed=0,
                     rows=[dict(config="sequential", devices=1, videos=50, colour=90.0, shape=80.0, direction=70.0,
                                seconds=60.0)])
    return {"meta": meta, "link": link, "models": {"m": {"request": request, "rows": [seq, row],
                                                        "projection": projection}},
            "full_size": full, "adherence": adherence}


def test_report_holds_every_section(tmp_path):
    result = _fake_result()
    text = markdown(result, ["plot.png"])
    for needle in ("No GPU was available", "| AsyncDiff N=2 S=1 warm-up 3 | 2 x 1 | 1.00 | 1.20 | 1.50x | 1.10x | 40.0",
                   "1.10 (+10%)", "largest error is 10.0%, within the 15% target", "| SVD-xt | 2 | 1 | 2 |",
                   "| sequential | 1 | 50 | 90% | 80% | 70% |", "![plot.png](plot.png)", "400, 380"):
        assert needle in text
    pytest.importorskip("matplotlib")
    from asyncvid.bench.report import plot_speedup, plot_warmup

    for plot in (plot_speedup, plot_warmup):
        path = plot(result, tmp_path / f"{plot.__name__}.png")
        assert path.read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_tiny_grid_runs_end_to_end(tmp_path, monkeypatch):
    from asyncvid.pipelines.tiny_models import build_tiny_svd

    folder = tmp_path / "tiny-svd"
    build_tiny_svd().save_pretrained(folder)
    config = BenchConfig(models=(str(folder),), size=64, frames=2, steps=2, warmups=(1,), repeats=1,
                         cfg_parallel=False, parataa_models=None, full_size=False, plots=False, busy=False,
                         link_gbps=1.0, link_latency_us=100.0,
                         out=tmp_path / "out")
    result = run_bench(config, log=lambda *a: None)
    rows = result["models"][str(folder)]["rows"]
    assert [r["kind"] for r in rows] == ["sequential", "sequential", "asyncdiff", "parataa"]
    asyncdiff, parataa = rows[2], rows[3]
    assert 20 < asyncdiff["psnr_db"] < 90 and 0 < asyncdiff["ssim"] <= 1  # approximate after warm-up, not noise
    assert asyncdiff["mib_sent_per_step_per_rank"][0] > 0 and len(asyncdiff["peak_mib_per_rank"]) == 2
    assert asyncdiff["predicted_loop_s"] > 0 and rows[0]["predicted_loop_s"] == pytest.approx(rows[0]["loop_s"],
                                                                                                rel=0.5)
    assert 1 <= parataa["parataa"]["rounds"] <= 2 and parataa["parataa"]["model_evaluations"] >= 4
    assert set(parataa["parataa_projection_s"]) >= {1, 2, 4}
    saved = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert saved["models"][str(folder)]["rows"][2]["config"] == "AsyncDiff N=2 S=1 warm-up 1"
    assert "AsyncDiff N=2 S=1 warm-up 1" in (tmp_path / "out" / "BENCHMARKS.md").read_text()


def test_refreshed_adherence_carries_its_own_stamp_and_leaves_the_grid_alone(tmp_path, monkeypatch):
    """`--adherence-only` rewrites the page: the adherence section says when, by which command and on which weights
    it was measured, with its smooth, calm and one colour columns; the grid's command stays the grid's (it used to grow by one
    command per refresh), and the notes kept in the grid's record come back in the header."""
    from asyncvid.bench import adherence
    from asyncvid.pipelines.embedded import EMBEDDED

    result = _fake_result()
    result["meta"]["notes"] = ["**Which weights:** the grid ran on older weights."]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "benchmarks.json").write_text(json.dumps(result))
    scored = dict(videos=2, colour=100.0, shape=50.0, direction=100.0, smooth=50.0, steady=100.0, calm=50.0,
                  one_colour=0.0, worst_flicker=7.5, seconds=1.0, misses=[])
    monkeypatch.setattr(adherence, "score_configuration", lambda *a: scored)
    config = BenchConfig(out=tmp_path / "out", adherence_only=True, adherence_prompts=2, plots=False,
                         command="python -m asyncvid.bench --adherence-only")
    run_bench(config, log=lambda *a: None)
    saved = json.loads((tmp_path / "out" / "benchmarks.json").read_text())
    assert saved["meta"]["command"] == "asyncvid bench"
    page = (tmp_path / "out" / "BENCHMARKS.md").read_text()
    revision = EMBEDDED["tiny-animatediff"].revision
    assert f"by `python -m asyncvid.bench --adherence-only` on tiny-animatediff {revision} (load average" in page
    assert "| sequential | 1 | 2 | 100% | 50% | 100% | 50% | 50% (7.5) | 0% | 1 |" in page
    assert "**Which weights:** the grid ran on older weights." in page.split("## Summary")[0]


def test_missing_matplotlib_is_refused_before_any_measuring(tmp_path, monkeypatch):
    """The plots come last; without matplotlib the bench stops at once, not after the measurements."""
    import importlib.util

    from asyncvid.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    measured = []
    config = BenchConfig(models=("tiny-svd",), out=tmp_path / "out", adherence_only=True)
    with pytest.raises(UsageError, match=r"matplotlib.*pip install -e '\.\[bench\]'"):
        run_bench(config, log=lambda *a: measured.append(a))
    assert measured == [] and not (tmp_path / "out").exists()


def test_the_benchmark_draws_the_sample_image_and_keeps_out_of_the_projects_docs(tmp_path, monkeypatch):
    """An installed package has no samples/ folder: the benchmark draws samples/red_circle.png itself, pixel for
    pixel; and its default output folder is not docs/, so a run in a checkout leaves the project's page alone."""
    from pathlib import Path

    from PIL import Image

    from asyncvid.bench.grid import sample_image

    monkeypatch.setenv("ASYNCVID_HOME", str(tmp_path))
    shipped = Path(__file__).parent.parent / "samples" / "red_circle.png"
    with Image.open(sample_image()) as drawn, Image.open(shipped) as original:
        assert np.array_equal(np.asarray(drawn.convert("RGB")), np.asarray(original.convert("RGB")))
    assert sample_image().parent == tmp_path / "bench"
    assert BenchConfig().out.parts[0] != "docs"


def test_the_report_keeps_sections_other_benchmarks_wrote(tmp_path):
    from asyncvid.bench.report import _kept_sections, replace_kept_section

    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\ntables\n")
    replace_kept_section(page, "batch", "## Many prompts\nfirst")
    replace_kept_section(page, "batch", "## Many prompts\nsecond")  # replaced, not appended twice
    text = page.read_text()
    assert text.count("## Many prompts") == 1 and "second" in text and "first" not in text
    assert text.startswith("# Benchmarks\n\ntables\n")
    assert _kept_sections(text) == "\n<!-- kept: batch -->\n## Many prompts\nsecond\n<!-- /kept: batch -->\n"
