"""The batch benchmark: many prompts at the CLI's defaults under each rank layout, side by side, then the cost model's
choice for 8 GPUs and 100 prompts of the full-size models.

`python -m asyncvid.bench.batch [--prompts 8] [--repeats 2] [--out docs]` runs `asyncvid generate` in a fresh process
per layout and repeat (the layouts' order rotating each repeat), times the whole command (the batch) and reads each
video's sampling time from its sidecar (the latency), and prints a table of medians. With --out it writes the table
into that folder's BENCHMARKS.md (a section of its own, which `asyncvid bench` keeps) and batch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from asyncvid.bench.archs import ARCHS, fake_costs
from asyncvid.bench.report import replace_kept_section
from asyncvid.eval.clips import heldout_captions
from asyncvid.runtime.auto import candidates

MODEL = "tiny-animatediff"
LAYOUTS = {  # name -> the options that make it (every other option at the CLI's default)
    "sequential, all threads": [],
    "AsyncDiff N=2": ["--sampler", "asyncdiff", "--devices", "2"],
    "data-parallel 2 x 1 thread": ["--data-parallel", "2"],
    "--parallel auto": ["--parallel", "auto"],
}


def asyncvid_command() -> list[str]:
    script = Path(sys.executable).with_name("asyncvid")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "asyncvid.cli.app"]


def run_layout(prompts: Path, options: list[str]) -> dict:
    """One batch in a fresh process: its wall time, each video's sampling time, and what --parallel auto chose."""
    with tempfile.TemporaryDirectory(prefix="asyncvid-batch-") as out:
        start = time.perf_counter()
        done = subprocess.run([*asyncvid_command(), "generate", str(prompts), "--out", out, *options],
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise RuntimeError(f"asyncvid generate {' '.join(options)} failed:\n{done.stderr[-2000:]}")
        latencies = [json.loads(p.read_text())["timings"]["total_s"] for p in Path(out).glob("*.json")]
    chosen = next((line.removeprefix("parallel auto: ") for line in done.stderr.splitlines()
                   if line.startswith("parallel auto: ")), None)
    return {"batch_s": wall, "latency_s": statistics.median(latencies), "videos": len(latencies), "chosen": chosen}


def measure(count: int, repeats: int, log=print) -> dict:
    """Every layout `repeats` times on `count` held-out prompts; medians, and ratios against sequential."""
    prompts = Path(tempfile.mkdtemp(prefix="asyncvid-prompts-")) / "prompts.txt"
    prompts.write_text("".join(c.text + "\n" for c in heldout_captions()[:count]))
    runs: dict[str, list[dict]] = {name: [] for name in LAYOUTS}
    load_before = os.getloadavg()[0]
    names = list(LAYOUTS)
    try:
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:  # rotate: no layout always goes first
                runs[name].append(run_layout(prompts, LAYOUTS[name]))
                log(f"  {name}: batch {runs[name][-1]['batch_s']:.1f} s")
    finally:
        shutil.rmtree(prompts.parent, ignore_errors=True)
    base = statistics.median(r["batch_s"] for r in runs[names[0]])
    rows = []
    for name, results in runs.items():
        batch = statistics.median(r["batch_s"] for r in results)
        rows.append({"layout": name, "batch_s": batch, "latency_s": statistics.median(r["latency_s"] for r in results),
                     "speedup": base / batch, "chosen": results[-1]["chosen"], "runs": [r["batch_s"] for r in results]})
    return {"model": MODEL, "prompts": count, "repeats": repeats, "cores": os.cpu_count(), "rows": rows,
            "load_before": load_before, "load_after": os.getloadavg()[0]}


def project(gpus: int = 8, videos: int = 100, steps: int = 25) -> list[dict]:
    """The cost model's best layouts of the full-size models on `gpus` GPUs: unit times in proportion to FLOPs
    (fake tensors), transfers left out; times in units of one video's sequential loop on one GPU."""
    rows = []
    for arch in ARCHS:
        profiles, _ = fake_costs(arch, arch.shape, ())
        flops = [float(p.flops) for p in profiles]
        unit = [f / sum(flops) / steps for f in flops]  # one video's loop on one GPU = 1
        for choice in candidates(lambda threads: unit, gpus, videos, steps, 3, cpu=False)[:4]:
            rows.append({"model": arch.name, "layout": choice.name(), "video": choice.video_s,
                         "batch": choice.batch_s})
    return rows


def markdown(result: dict, projection: list[dict], command: str) -> str:
    lines = [
        "## Many prompts: data-parallel groups",
        "",
        f"`{command}`: {result['prompts']} held-out prompts with {result['model']} at the CLI's defaults, each "
        f"layout {result['repeats']} times in a fresh `asyncvid generate` (the order rotating), on {result['cores']} "
        f"cores; load average {result['load_before']:.1f} before, {result['load_after']:.1f} after. *Batch* is the "
        "whole command (loading included), *latency* a video's sampling time from its sidecar; medians.",
        "",
        "| layout | batch (s) | speedup | latency per video (s) | runs (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        name = r["layout"] + (f" → {r['chosen'].split(':')[0]}" if r["chosen"] else "")
        lines.append(f"| {name} | {r['batch_s']:.1f} | {r['speedup']:.2f}x | {r['latency_s']:.1f} | "
                     f"{', '.join(f'{s:.1f}' for s in r['runs'])} |")
    lines += [
        "",
        "The cost model's best layouts for 100 prompts on 8 GPUs (`asyncvid plan --parallel auto --videos 100 "
        "--devices 8` on a GPU machine measures unit times instead of these FLOPs): times in units of one video's "
        "sequential loop on one GPU, transfers left out.",
        "",
        "| model | layout | per video | batch |",
        "|---|---|---:|---:|",
        *(f"| {r['model']} | {r['layout']} | {r['video']:.2f} | {r['batch']:.1f} |" for r in projection),
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m asyncvid.bench.batch", description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder whose BENCHMARKS.md gets the section (the project's: docs)")
    args = parser.parse_args(argv)
    command = " ".join(["python -m asyncvid.bench.batch", *(sys.argv[1:] if argv is None else argv)])
    result = measure(args.prompts, args.repeats)
    projection = project()
    text = markdown(result, projection, command)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batch.json").write_text(json.dumps({"measured": result, "projection": projection}, indent=2)
                                             + "\n")
        replace_kept_section(args.out / "BENCHMARKS.md", "batch", text)


if __name__ == "__main__":
    main()
