"""`python -m asyncvid.parataa_rounds`: ParaTAA's rounds to convergence against sequential sampling, on the embedded
models at 25 and 50 steps, written into docs/PARATAA.md (between its `rounds table` markers).

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

from .generate import to_uint8
from .measure import psnr
from .parataa_config import ParaTAAConfig
from .parataa_run import sample
from .requests import ImageToVideo, TextToVideo

DOC = Path(__file__).resolve().parent.parent / "docs" / "PARATAA.md"
BEGIN, END = "<!-- rounds table: begin -->", "<!-- rounds table: end -->"
SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def requests(model: str, steps: int, seed: int = 0):
    """The CLI's default request of each embedded model, at `steps` steps (and the model's recommended guidance)."""
    if model == "tiny-animatediff":
        from .sources import recommended_guidance

        return TextToVideo("a red circle moving left", num_inference_steps=steps, seed=seed,
                           guidance_scale=recommended_guidance(model))
    return ImageToVideo(SAMPLES / "red_circle.png", num_inference_steps=steps, seed=seed)


def measure(model: str, steps: int, configs: dict[str, ParaTAAConfig]) -> list[dict]:
    """One row per configuration: rounds, model evaluations, PSNR of its frames against the pipeline's own."""
    from .pipelines import load_pipeline

    pipe, adapter, _ = load_pipeline(model, device=torch.device("cpu"), dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    request = requests(model, steps)
    with torch.inference_mode():
        latents = adapter.call(pipe, request, generator=torch.Generator().manual_seed(request.seed), callback=None,
                               output_type="latent")
        frames = latents.shape[adapter.FRAME_DIM]
        want = to_uint8(adapter.decode(pipe, latents, request, 0, frames))
    rows = []
    for name, config in configs.items():
        start = time.perf_counter()
        got, solution, branches = sample(pipe, adapter, request, config)
        with torch.inference_mode():
            video = to_uint8(adapter.decode(pipe, got, request, 0, frames))
        rows.append({"model": model, "steps": steps, "config": name, "rounds": len(solution.rounds),
                     "converged": solution.converged, "evaluations": solution.evaluations,
                     "evaluation_ratio": solution.evaluations / steps, "psnr": psnr(video, want),
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
    parser.add_argument("--steps", type=int, nargs="+", default=[25, 50])
    parser.add_argument("--models", nargs="+", default=["tiny-animatediff", "tiny-svd"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    args = parser.parse_args(argv)
    from .jobs import quiet_libraries

    quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    default = ParaTAAConfig()
    configs = {"defaults (TAA, m=2)": default, "m=1 (no TAA)": replace(default, history=1),
               "order 4, m=2": replace(default, order=4)}
    rows = [row for model in args.models for steps in args.steps for row in measure(model, steps, configs)]
    text = table(rows)
    print(text)
    if not args.no_write:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN)
        _, tail = rest.split(END)
        stamp = f"Measured {time.strftime('%Y-%m-%d')} by `python -m asyncvid.parataa_rounds` (default settings: " \
                f"window = all steps, order = window, history {default.history}, tol {default.tol})."
        DOC.write_text(f"{head}{BEGIN}\n{stamp}\n\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
