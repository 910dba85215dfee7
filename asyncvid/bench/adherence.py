"""The benchmark's adherence section: do parallel samplers keep what the prompt asks (colour, shape, direction) on the
held-out prompts? Each configuration loads the model once (asyncvid.load) and samples every prompt with seed 0."""

from __future__ import annotations

import os
import time

from asyncvid.api import load
from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.eval.adherence import score_video, summarize
from asyncvid.eval.clips import heldout_captions
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines.embedded import EMBEDDED

MODEL = "tiny-animatediff"


def configurations(warmups, parataa: bool) -> list[tuple[str, int, object]]:
    """(label, devices, sampler): sequential, AsyncDiff N=2 at each warm-up, ParaTAA on 2 ranks."""
    out = [("sequential", 1, None)]
    out += [(f"AsyncDiff N=2 warm-up {w}", 2, AsyncDiffConfig(stages=2, warmup=w)) for w in warmups]
    if parataa:
        out.append(("ParaTAA on 2 ranks", 2, ParaTAAConfig()))
    return out


def score_configuration(model: str, devices: int, sampler, prompts: list[str], steps: int) -> dict:
    """Scores of every prompt sampled with one configuration, and their summary."""
    start = time.perf_counter()
    with load(model, devices=devices, sampler=sampler) as pipe:
        scores = [score_video(pipe.text_to_video(p, num_inference_steps=steps, seed=0).frames, p) for p in prompts]
    return {**summarize(scores), "seconds": round(time.perf_counter() - start, 1),
            "misses": [s["prompt"] for s in scores if min(s["colour"], s["shape"], s["direction"]) < 1]}


def adherence_section(config, log, model: str = MODEL) -> dict:
    """Adherence of sequential sampling, AsyncDiff N=2 at the benchmark's warm-ups, and ParaTAA (on the first
    `adherence_parataa_prompts` prompts: it costs several sequential runs per video on a CPU)."""
    # The captions of samples/heldout_prompts.txt (a test keeps the two equal), from code: a wheel has no samples/.
    prompts = [c.text for c in heldout_captions()][: config.adherence_prompts]
    load_before, rows = os.getloadavg()[0], []
    for label, devices, sampler in configurations(config.adherence_warmups, config.parataa):
        chosen = prompts[: config.adherence_parataa_prompts] if isinstance(sampler, ParaTAAConfig) else prompts
        result = score_configuration(model, devices, sampler, chosen, config.steps)
        rows.append({"config": label, "devices": devices, **result})
        log(f"adherence {label}: {result}")
    # The section's own stamp: it is refreshed without the timing grid (--adherence-only), on other weights.
    return {"model": model, "prompts_file": "samples/heldout_prompts.txt", "steps": config.steps, "seed": 0,
            "rows": rows, "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": config.command,
            "revision": EMBEDDED[model].revision if model in EMBEDDED else None,
            "load_average": [load_before, os.getloadavg()[0]]}
