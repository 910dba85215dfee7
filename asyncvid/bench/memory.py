"""Per-rank memory of the real checkpoint forms: peak and steady resident memory and load time of every rank, for
SVD-xt and SD1.5 + AnimateDiff v1-5-2 (a base folder plus the motion adapter, and the merged AnimateDiff folder), at
1 (sequential), 2 and 3 ranks of AsyncDiff, with and without --weight-cap. The models are asyncvid.bench.checkpoints'
random-weight builds of the published architectures, float16 files loaded as float32, 4 frames at 64x64, AsyncDiff's
defaults (stages balanced on unit times measured on rank 0, cached per machine and shape).

    python -m asyncvid.bench.memory --out docs     # builds the models once under --root (about 8 GB), ~15 min

Peaks include the pages of any file a process maps while loading, as the kernel counts them: diffusers' loaders map
safetensors files (sequential sampling here); asyncvid's stage loading reads its tensors without mapping.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.bench.checkpoints import build
from asyncvid.bench.report import replace_kept_section
from asyncvid.bench.runs import isolated
from asyncvid.pipelines import animatediff
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import ModelSpec, load_sampler, quiet_libraries

NOTE = ("At 4 frames of 64x64 the low-resolution units, which hold most of the weights, are memory-bound, so their "
        "measured times are large and the measured split puts fewer weights on its larger stage than the FLOPs "
        "split (the `--cost flops` rows: 78-81% of the UNet on one stage). That split is sensitive to timing noise, "
        "since several splits balance within a few percent: over five runs of this benchmark the SD1.5 base + "
        "adapter form's larger N=2 stage held 59-76% of the UNet (0.64x-0.79x of sequential's peak), SVD-xt's "
        "52-67% (0.41x-0.52x). At full resolution the measured split follows FLOPs; there `--weight-cap` bounds "
        "the larger stage's share, at some compute balance (`asyncvid plan` shows both).")
SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "red_circle.png"
GB = 1024**3


@dataclass(frozen=True)
class Form:
    """One model as a user has it: the model folder, and the motion adapter folder for a base model."""

    name: str
    model: str
    motion_adapter: str | None = None
    image_to_video: bool = False

    def request(self, steps: int):
        size = dict(num_frames=4, height=64, width=64, num_inference_steps=steps)
        if self.image_to_video:
            return ImageToVideo(image=SAMPLE, **size)
        return TextToVideo(prompt="a red circle moving left", **size)


def forms(root: Path, scale: str) -> list[Form]:
    """The three forms, built under `root` once (a rerun reuses them)."""
    folders = {}
    for name in ("svd-xt", "sd15", "motion-v152"):
        path = root / scale / name
        if not (path / ".done").is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            built = build(name, path.parent, form="fp16", scale=scale, hub_cache=False)
            built.rename(path)
            (path / ".done").touch()
        folders[name] = path
    merged = root / scale / "animatediff"
    if not (merged / ".done").is_file():
        isolated(_merge, folders["sd15"], folders["motion-v152"], merged)
        (merged / ".done").touch()
    return [Form("SVD-xt", str(folders["svd-xt"]), image_to_video=True),
            Form("AnimateDiff, SD1.5 base + adapter", str(folders["sd15"]), str(folders["motion-v152"])),
            Form("AnimateDiff, merged folder", str(merged))]


def _merge(sd: Path, motion: Path, out: Path) -> None:
    """The AnimateDiff folder a user saves after merging (AnimateDiffPipeline.save_pretrained, fp16 variant)."""
    pipe = animatediff.load(sd, dtype=torch.float16, motion_adapter=motion, variant="fp16")
    pipe.save_pretrained(out, variant="fp16")


def resident() -> dict[str, int]:
    """This process's peak (VmHWM) and current (VmRSS) resident memory in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmHWM", "VmRSS")}


def _rank(rank, spec, request) -> list[dict]:
    start = time.perf_counter()
    loaded = load_sampler(rank, spec)
    load_s = time.perf_counter() - start
    after_load = resident()
    loaded.sample(request)
    after = resident()
    mine = {"load_s": load_s, "load_peak": after_load["VmHWM"], "peak": after["VmHWM"], "steady": after["VmRSS"],
            "share": loaded.weight_share}
    every = [None] * rank.world_size
    dist.all_gather_object(every, mine, group=rank.group)
    return every


def _run(form: Form, ranks: int, weight_cap: float, cost: str, steps: int) -> list[dict]:
    quiet_libraries()
    sampler = None if ranks == 1 else AsyncDiffConfig(stages=ranks, warmup=1, weight_cap=weight_cap, cost=cost)
    spec = ModelSpec(form.model, sampler, form.motion_adapter, "cpu", "float32", variant="fp16")
    return launch.run(_rank, ranks, torch.device("cpu"), spec, form.request(steps), threads=1,
                      oversubscribe=True)


def measure(forms_: list[Form], steps: int) -> list[dict]:
    """Each form at N = 1, 2, 3, at N = 2 with --weight-cap 0.6, and at N = 2 balanced by FLOPs (the split a
    full-resolution run's measured times come close to), each run in a fresh process."""
    rows = []
    for form in forms_:
        for ranks, cap, cost in ((1, 1.0, "measured"), (2, 1.0, "measured"), (2, 0.6, "measured"),
                                 (3, 1.0, "measured"), (2, 1.0, "flops")):
            start = time.perf_counter()
            per_rank = isolated(_run, form, ranks, cap, cost, steps)
            rows.append({"form": form.name, "ranks": ranks, "weight_cap": cap, "cost": cost, "per_rank": per_rank,
                         "wall_s": time.perf_counter() - start})
            print(table_row(rows[-1], rows), flush=True)
    return rows


def _sequential_peak(row: dict, rows: list[dict]) -> int:
    return next(r["per_rank"][0]["peak"] for r in rows if r["form"] == row["form"] and r["ranks"] == 1)


def table_row(row: dict, rows: list[dict]) -> str:
    per = row["per_rank"]
    ratio = max(r["peak"] for r in per) / _sequential_peak(row, rows)
    cap = "—" if row["ranks"] == 1 or row["weight_cap"] == 1 else f"{row['weight_cap']:g}"
    sampler = "sequential" if row["ranks"] == 1 else f"AsyncDiff N={row['ranks']}"
    sampler += ", --cost flops" if row.get("cost") == "flops" else ""
    peaks = " / ".join(f"{r['peak'] / GB:.1f}" for r in per)
    steady = " / ".join(f"{r['steady'] / GB:.1f}" for r in per)
    shares = " / ".join(f"{100 * r['share']:.0f}%" for r in per)
    loads = " / ".join(f"{r['load_s']:.0f}" for r in per)
    return (f"| {row['form']} | {sampler} | {cap} | {peaks} | **{ratio:.2f}x** | {steady} | {shares} | {loads} |")


def markdown(rows: list[dict], meta: dict) -> str:
    lines = ["## Memory per rank: the real checkpoint forms", "",
             f"`python -m asyncvid.bench.memory --out docs` ({meta['scale']} size; {meta['when']}, torch "
             f"{torch.__version__}, load average {meta['load_before']} before and {meta['load_after']} after). "
             f"Random-weight builds of the published architectures (asyncvid.bench.checkpoints), fp16 files loaded "
             f"as float32 on the CPU, 4 frames at 64x64, {meta['steps']} steps, one thread per rank, AsyncDiff's "
             f"defaults (warm-up 1, stages balanced on unit times measured on rank 0). Per rank, "
             f"slash-separated: peak resident memory (VmHWM, GB, including the pages of files it mapped), "
             f"its ratio to sequential sampling's peak (the largest rank's), resident memory after sampling, the "
             f"share of the UNet's weights it holds, and load seconds.", "",
             "| model | sampler | weight cap | peak GB | largest peak vs sequential | steady GB | UNet share | load s |",
             "|---|---|---|---|---:|---|---|---|"]
    lines += [table_row(row, rows) for row in rows]
    lines += ["", NOTE]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncvid.bench.memory", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="a folder whose BENCHMARKS.md gets the table (the project's: docs)")
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("ASYNCVID_HOME") or
                                                           Path.home() / ".cache" / "asyncvid") / "memory-bench",
                        help="where the models are built (once)")
    parser.add_argument("--scale", choices=("full", "small"), default="full",
                        help="full: the published sizes; small: reduced widths, for a quick try")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    load_before = os.getloadavg()[0]
    rows = measure(forms(args.root, args.scale), args.steps)
    meta = {"scale": args.scale, "when": time.strftime("%Y-%m-%d"), "steps": args.steps,
            "load_before": f"{load_before:.1f}", "load_after": f"{os.getloadavg()[0]:.1f}"}
    text = markdown(rows, meta)
    print(text)
    if args.out is not None:
        replace_kept_section(args.out / "BENCHMARKS.md", "memory", text)
        (args.out / "memory.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.out / 'BENCHMARKS.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
