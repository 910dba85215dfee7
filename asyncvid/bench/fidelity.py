"""`python -m asyncvid.bench.fidelity`: how close each sampler option comes to sequential sampling, and at what speed.

For both embedded models at the CLI's default request and several step counts: every AsyncDiff option at N=2 on two
real processes (one thread each; the loop timed against sequential sampling on both threads, and against the paper's
own method, `--stale reuse`, in the same run), and every ParaTAA setting in this process (rounds are its latency with
one device per row of a round, so speed is steps / rounds; it does not depend on the machine). PSNR over the whole
clip and SSIM per frame, both against sequential sampling of the same request. With --out, the table goes into that
folder's BENCHMARKS.md (a section of its own, which `asyncvid bench` keeps), fidelity.json and a plot of PSNR
against speedup.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.bench.measure import asyncdiff_sample, sequential_sample
from asyncvid.bench.parataa_rounds import requests
from asyncvid.bench.report import _pyplot, check_plotting, replace_kept_section
from asyncvid.eval.fidelity import compare, psnr
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.requests import ImageToVideo
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import ModelSpec, load_sampler, quiet_libraries

MODELS = ("tiny-svd", "tiny-animatediff")
ASYNCDIFF = {  # name -> config, N=2 at the CLI's default warm-up
    "reuse (the paper)": AsyncDiffConfig(stale="reuse"),
    "extrapolate (default)": AsyncDiffConfig(),
    "extrapolate + time shift": AsyncDiffConfig(time_shift=True),
    "extrapolate, warm-up 1": AsyncDiffConfig(warmup=1),
}
PARATAA = {  # name -> config
    "defaults (jump start, sample tol 0.06)": ParaTAAConfig(),
    "the paper's (noise start, tol 1e-3 + atol 1e-3)": ParaTAAConfig(start="noise", sample_tol=None),
    "before (noise start, tol 0.02 relative)": ParaTAAConfig(start="noise", sample_tol=None, tol=0.02, atol=0.0),
    "jump start, per-step rule only": ParaTAAConfig(sample_tol=None),
}


def asyncdiff_rows(model: str, steps: int, repeats: int, log=print) -> list[dict]:
    request = requests(model, steps)
    with launch.cpu_threads(2, torch.device("cpu")):
        reference = sequential_sample(model, request, repeats=repeats)
    rows = []
    for name, config in ASYNCDIFF.items():
        got = launch.run(asyncdiff_sample, config.world_size, torch.device("cpu"), model, request, config,
                         torch.float32, repeats, threads=1)
        rows.append(_row("asyncdiff", model, steps, name, got.frames, reference.frames,
                         loop_s=got.loop_s, speedup=reference.loop_s / got.loop_s))
        log(_line(rows[-1]))
    paper = rows[0]["loop_s"]
    for row in rows:
        row["vs_paper"] = row["loop_s"] / paper
    return rows


def paired_timing(model: str, steps: int, pairs: int, repeats: int, log=print) -> dict:
    """The loop of `--stale extrapolate` against `--stale reuse`, interleaved (the order alternating pair by pair,
    each a fresh pair of processes timing `repeats` calls): the ratio of each pair, and their median."""
    request = requests(model, steps)
    loops = {"reuse": [], "extrapolate": []}
    for i in range(pairs):
        for stale in (("reuse", "extrapolate") if i % 2 == 0 else ("extrapolate", "reuse")):
            got = launch.run(asyncdiff_sample, 2, torch.device("cpu"), model, request, AsyncDiffConfig(stale=stale),
                             torch.float32, repeats, threads=1)
            loops[stale].append(got.loop_s)
    ratios = [e / r for e, r in zip(loops["extrapolate"], loops["reuse"])]
    row = {"model": model, "steps": steps, "reuse_s": statistics.median(loops["reuse"]),
           "extrapolate_s": statistics.median(loops["extrapolate"]), "ratios": ratios,
           "median_ratio": statistics.median(ratios)}
    log(f"{model} {steps} steps: extrapolate / reuse loop, pair by pair: "
        f"{', '.join(f'{r:.3f}' for r in ratios)} (median {row['median_ratio']:.3f})")
    return row


def timing_table(rows: list[dict], pairs: int, repeats: int, date: str, load: tuple[float, float]) -> str:
    lines = ["## Fidelity options: the cost of extrapolation", "",
             f"Measured {date} by `python -m asyncvid.bench.fidelity --pairs {pairs} --out docs` (load average "
             f"{load[0]:.1f} before, {load[1]:.1f} after, on {os.cpu_count()} cores). AsyncDiff N=2 at the CLI's "
             f"default request, `--stale extrapolate` against `--stale reuse`: {pairs} pairs of runs, the order "
             f"alternating, each run a fresh pair of processes timing {repeats} calls after a warm-up call (median).",
             "", "| model | steps | reuse loop (s) | extrapolate loop (s) | extrapolate / reuse, pair by pair | median |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['steps']} | {r['reuse_s']:.2f} | {r['extrapolate_s']:.2f} | "
                     f"{', '.join(f'{x:.3f}' for x in r['ratios'])} | {r['median_ratio']:.3f}x |")
    return "\n".join(lines)


def parataa_rows(model: str, steps: int, log=print) -> list[dict]:
    request = requests(model, steps)
    want = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).frames
    rows = []
    for name, config in PARATAA.items():
        got = load_sampler(None, ModelSpec(model, config, device="cpu", dtype="float32")).sample(request)
        record = got.record["parataa"]
        rows.append(_row("parataa", model, steps, name, got.frames, want, rounds=record["rounds"],
                         converged=record["converged"], speedup=steps / record["rounds"],
                         evaluations=record["model_evaluations"] // record["branches"]))
        log(_line(rows[-1]))
    return rows


def _row(sampler, model, steps, name, frames, want, **extra) -> dict:
    return {"sampler": sampler, "model": model, "steps": steps, "option": name, "psnr": psnr(frames, want),
            "ssim": compare(frames, want)["ssim"], **extra}


def _line(r: dict) -> str:
    if r["sampler"] == "parataa":
        speed = f"{r['rounds']} rounds{'' if r['converged'] else ' (not converged)'}, {r['evaluations']} evaluations"
    else:
        speed = f"loop {r['loop_s']:.2f} s, {r['speedup']:.2f}x sequential"
    return f"{r['sampler']} {r['model']} {r['steps']} steps, {r['option']}: {r['psnr']:.1f} dB, SSIM {r['ssim']:.4f}; {speed}"


def _settings(request) -> str:
    """The recommended settings a request samples with, in words."""
    if isinstance(request, ImageToVideo):
        return (f"guidance rising to {request.max_guidance_scale:g}, shared noise {request.shared_noise:g} and "
                f"noise mean {request.noise_mean:g}")
    return (f"guidance {request.guidance_scale:g}, shared noise {request.shared_noise:g}, noise mean "
            f"{request.noise_mean:g} and shared grid {request.shared_grid}")


def table(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "## Fidelity options",
        "",
        f"Measured {result['date']} by `python -m asyncvid.bench.fidelity --out docs` ({result['minutes']:.0f} min; "
        f"load average {result['load_before']:.1f} before, {result['load_after']:.1f} after, on {os.cpu_count()} "
        "cores). Each model at the CLI's default request (tiny-svd: samples/red_circle.png, its sampling.json's "
        f"{_settings(requests('tiny-svd', 25))}; tiny-animatediff: "
        f"\"a red circle moving left\", its sampling.json's {_settings(requests('tiny-animatediff', 25))}), seed 0, "
        "float32. PSNR over the whole clip and mean SSIM per frame, both against sequential sampling of the same "
        "request.",
        "",
        f"AsyncDiff, N=2 on two processes of one thread each, warm-up 3 unless named; *loop* is the median of "
        f"{result['repeats']} calls after a warm-up call; *vs sequential* against sequential sampling on both threads; "
        "*vs the paper* the loop time against `--stale reuse` in the same run (above 1.00x: slower).",
        "",
        "| model | steps | option | PSNR (dB) | SSIM | loop (s) | vs sequential | vs the paper |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["sampler"] == "asyncdiff"):
        lines.append(f"| {r['model']} | {r['steps']} | {r['option']} | {r['psnr']:.1f} | {r['ssim']:.4f} | "
                     f"{r['loop_s']:.2f} | {r['speedup']:.2f}x | {r['vs_paper']:.3f}x |")
    lines += [
        "",
        "ParaTAA, in one process; *rounds* are its sequential depth, so with one device per row of a round its "
        "speedup over sequential sampling is steps / rounds.",
        "",
        "| model | steps | settings | PSNR (dB) | SSIM | rounds | steps / rounds | model evaluations |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["sampler"] == "parataa"):
        mark = "" if r["converged"] else " (not converged)"
        lines.append(f"| {r['model']} | {r['steps']} | {r['option']} | {r['psnr']:.1f} | {r['ssim']:.4f} | "
                     f"{r['rounds']}{mark} | {r['speedup']:.1f} | {r['evaluations']} |")
    if result.get("plot"):
        lines += ["", f"![PSNR against speedup]({result['plot']})"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, sampler, xlabel in ((axes[0], "asyncdiff", "loop speedup over sequential (2 threads)"),
                                (axes[1], "parataa", "steps / rounds (speedup with a device per row)")):
        options = list(dict.fromkeys(r["option"] for r in rows if r["sampler"] == sampler))
        for i, option in enumerate(options):
            for j, model in enumerate(MODELS):
                pts = [r for r in rows if r["sampler"] == sampler and r["option"] == option and r["model"] == model]
                ax.scatter([r["speedup"] for r in pts], [min(r["psnr"], 80) for r in pts], color=f"C{i}",
                           marker="os"[j], label=f"{option}, {model}")
        ax.set_title("AsyncDiff N=2" if sampler == "asyncdiff" else "ParaTAA")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("PSNR against sequential (dB)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 25, 50])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--samplers", nargs="+", default=["asyncdiff", "parataa"], choices=["asyncdiff", "parataa"])
    parser.add_argument("--repeats", type=int, default=3, help="timed AsyncDiff calls after a warm-up call")
    parser.add_argument("--pairs", type=int, default=0, help="instead of the sweep: time extrapolation against "
                        "reuse in this many interleaved pairs of runs per model (at the first of --steps)")
    parser.add_argument("--out", type=Path, help="a folder whose BENCHMARKS.md gets the table (the project's: docs)")
    args = parser.parse_args(argv)

    quiet_libraries()
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    if args.pairs:
        rows = [paired_timing(model, args.steps[0], args.pairs, 5) for model in args.models]
        text = timing_table(rows, args.pairs, 5, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                            (load_before, os.getloadavg()[0]))
        print(text)
        if args.out:
            replace_kept_section(args.out / "BENCHMARKS.md", "fidelity-timing", text)
        return
    if args.out:
        check_plotting()
    rows = []
    for model in args.models:
        for steps in args.steps:
            if "asyncdiff" in args.samplers:
                rows += asyncdiff_rows(model, steps, args.repeats)
            if "parataa" in args.samplers and steps >= 25:  # ParaTAA's sweep: 25 and 50 steps
                with launch.cpu_threads(2, torch.device("cpu")):
                    rows += parataa_rows(model, steps)
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": rows, "repeats": args.repeats,
              "minutes": (time.perf_counter() - start) / 60, "load_before": load_before,
              "load_after": os.getloadavg()[0]}
    if args.out:
        (args.out / "fidelity.json").write_text(json.dumps(result, indent=1) + "\n")
        plot(rows, args.out / "bench_fidelity.png")
        result["plot"] = "bench_fidelity.png"
    text = table(result)
    print(text)
    if args.out:
        replace_kept_section(args.out / "BENCHMARKS.md", "fidelity", text)


if __name__ == "__main__":
    main()
