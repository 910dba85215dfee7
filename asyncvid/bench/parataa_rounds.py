"""`python -m asyncvid.bench.parataa_rounds`: ParaTAA's rounds to convergence against sequential sampling, on the embedded
models at 25 and 50 steps; with `--doc docs/PARATAA.md`, written between that file's `rounds table` markers.

Rounds are the sequential depth of the solve: with one device per window step (and guidance branch), a round takes
one model call's time, so rounds / steps is ParaTAA's latency relative to sequential sampling. The count does not
depend on the machine, so this runs on the CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import torch

from asyncvid.bench.grid import sample_image
from asyncvid.eval.fidelity import psnr
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines import recommended_sampling
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime.loaders import ModelSpec, load_sampler, quiet_libraries

BEGIN, END = "<!-- rounds table: begin -->", "<!-- rounds table: end -->"


def requests(model: str, steps: int, seed: int = 0):
    """The CLI's default request of each embedded model, at `steps` steps (and the model's recommended settings)."""
    own = recommended_sampling(model)
    if model == "tiny-animatediff":
        return TextToVideo("a red circle moving left", num_inference_steps=steps, seed=seed,
                           guidance_scale=own.guidance_scale, shared_noise=own.shared_noise,
                           noise_mean=own.noise_mean, shared_grid=own.shared_grid)
    return ImageToVideo(sample_image(), num_inference_steps=steps, seed=seed,
                        max_guidance_scale=own.max_guidance_scale, shared_noise=own.shared_noise,
                        noise_mean=own.noise_mean)


def measure(model: str, steps: int, configs: dict[str, ParaTAAConfig]) -> list[dict]:
    """One row per configuration: rounds, model evaluations, PSNR of its frames against sequential sampling's, each
    sampled as the CLI samples it (asyncvid.runtime.loaders) on the CPU in float32."""
    request = requests(model, steps)
    want = load_sampler(None, ModelSpec(model, device="cpu", dtype="float32")).sample(request).frames
    rows = []
    for name, config in configs.items():
        loaded = load_sampler(None, ModelSpec(model, config, device="cpu", dtype="float32"))
        start = time.perf_counter()
        got = loaded.sample(request)
        record = got.record["parataa"]
        evaluations = record["model_evaluations"] // record["branches"]
        rows.append({"model": model, "steps": steps, "config": name, "rounds": record["rounds"],
                     "converged": record["converged"], "evaluations": evaluations,
                     "evaluation_ratio": evaluations / steps, "psnr": psnr(got.frames, want),
                     "seconds": time.perf_counter() - start})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | steps | settings | rounds | steps / rounds | model evaluations (x sequential) | PSNR vs sequential |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = "" if r["converged"] else " (not converged)"
        lines.append(f"| {r['model']} | {r['steps']} | {r['config']} | {r['rounds']}{mark} | "
                     f"{r['steps'] / r['rounds']:.1f} | {r['evaluations']} ({r['evaluation_ratio']:.1f}x) | "
                     f"{r['psnr']:.1f} dB |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100])
    parser.add_argument("--models", nargs="+", default=["tiny-animatediff", "tiny-svd"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--doc", type=Path, help="a markdown file whose rounds table to replace (the project's: "
                        "docs/PARATAA.md); without it, the table is only printed")
    args = parser.parse_args(argv)

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    default = ParaTAAConfig()
    configs = {"defaults": default,
               "the paper's (noise start, no sample tol)": replace(default, start="noise", sample_tol=None),
               "m=1 (no TAA)": replace(default, history=1),
               "before (noise start, tol 0.02 relative)": replace(default, start="noise", sample_tol=None, tol=0.02,
                                                                 atol=0.0)}
    rows = [row for model in args.models for steps in args.steps for row in measure(model, steps, configs)]
    text = table(rows)
    print(text)
    if args.doc is not None:
        doc = args.doc.read_text()
        head, rest = doc.split(BEGIN)
        _, tail = rest.split(END)
        threads = f" --threads {args.threads}" if args.threads else ""  # the thread count changes float rounding
        stamp = (f"Measured {time.strftime('%Y-%m-%d')} by `python -m asyncvid.bench.parataa_rounds --doc docs/PARATAA.md"
                 f"{threads}` "
                 f"(default settings: window = all steps, order = window, history {default.history}, start "
                 f"{default.start}, tol {default.tol} + atol {default.atol}, sample tol {default.sample_tol}).")
        args.doc.write_text(f"{head}{BEGIN}\n{stamp}\n\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
