"""`python -m asyncvid.bench.gpu_check`: what a CUDA machine must show before asyncvid's GPU path is trusted.

One GPU, a few minutes: sequential sampling in float16 and bfloat16 against float32; AsyncDiff's schedule (the
single-process oracle) on the GPU in those dtypes with warm-up = steps (sequential, within the dtype's rounding) and
at its defaults (its fidelity); the base-model-plus-motion-adapter path's placement on the GPU; ParaTAA against
sequential; unit times of the full-size SVD-xt and AnimateDiff UNets for the cost model. With two or more GPUs it
also runs AsyncDiff on NCCL against the oracle and kills a rank mid-run (every rank must exit, named, within 30 s).
`--device cpu` runs the same checks at tiny sizes in bfloat16 (what the test suite does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.oracle import apply_oracle
from asyncvid.asyncdiff.setup import flops_plan, setup_asyncdiff
from asyncvid.bench.archs import ARCHS, cuda_unit_times
from asyncvid.bench.grid import sample_image
from asyncvid.bench.measure import asyncdiff_sample
from asyncvid.eval.fidelity import psnr
from asyncvid.parataa.config import ParaTAAConfig
from asyncvid.pipelines import adapter_for, units_for
from asyncvid.pipelines.tiny_models import CHANNELS, DOWN_2D, LATENT_SIZE, UP_2D, build_tiny_animatediff
from asyncvid.requests import ImageToVideo, TextToVideo
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import ModelSpec, load_sampler, quiet_libraries

FLOOR_DB = 30.0  # lower precision against float32, and the schedule in it against sequential in it
MODELS = ("tiny-svd", "tiny-animatediff")


def request_for(model: str, size: int, frames: int, steps: int):
    common = dict(num_frames=frames, height=size, width=size, num_inference_steps=steps, seed=0)
    if model == "tiny-svd":
        return ImageToVideo(sample_image(), **common)
    return TextToVideo("a red circle moving left", guidance_scale=2.5, **common)


def sequential(model: str, request, device: str, dtype: str):
    return load_sampler(None, ModelSpec(model, device=device, dtype=dtype)).sample(request)


def scheduled(model: str, request, device: str, dtype: str, config: AsyncDiffConfig):
    """AsyncDiff's schedule on one device: the oracle on the whole UNet, split by the run's FLOPs plan."""
    loaded = load_sampler(None, ModelSpec(model, device=device, dtype=dtype))
    unet = loaded.pipe.unet
    family = units_for(unet)
    shape = {"frames": request.num_frames, "height": request.height, "width": request.width}
    _, plan = flops_plan(unet, family, config, shape)
    apply_oracle(unet, family.build_program(unet), plan, config, loaded.pipe.scheduler)
    return loaded.sample(request)


def check_precision(device: str, dtypes, size, frames, steps) -> list[dict]:
    rows = []
    for model in MODELS:
        request = request_for(model, size, frames, steps)
        reference = sequential(model, request, device, "float32")
        for dtype in dtypes:
            got = sequential(model, request, device, dtype)
            rows.append(_row(f"sequential {dtype} vs float32", model, psnr(got.frames, reference.frames)))
    return rows


def check_schedule(device: str, dtypes, size, frames, steps) -> list[dict]:
    rows = []
    for model in MODELS:
        request = request_for(model, size, frames, steps)
        for dtype in dtypes:
            reference = sequential(model, request, device, dtype)
            for label, config in (("warm-up = steps", AsyncDiffConfig(stages=2, stride=2, warmup=steps,
                                                                      cfg_parallel=True, cost="flops")),
                                  ("defaults", AsyncDiffConfig(stages=2, stride=2, cfg_parallel=True, cost="flops"))):
                got = scheduled(model, request, device, dtype, config)
                floor = FLOOR_DB if label == "warm-up = steps" else None  # the defaults are approximate: reported
                rows.append(_row(f"AsyncDiff N=2 S=2 CFG split, {label}, {dtype} vs sequential {dtype}", model,
                                 psnr(got.frames, reference.frames), floor))
    return rows


def check_parataa(device: str, dtype: str, size, frames, steps) -> list[dict]:
    rows = []
    for model in MODELS:
        request = request_for(model, size, frames, steps)
        reference = sequential(model, request, device, dtype)
        got = load_sampler(None, ModelSpec(model, ParaTAAConfig(), device=device, dtype=dtype)).sample(request)
        rounds = got.record["parataa"]["rounds"]
        rows.append(_row(f"ParaTAA ({rounds} rounds for {steps} steps), {dtype} vs sequential", model,
                         psnr(got.frames, reference.frames), 25.0))
    return rows


def check_placement(device: str, dtype: str, root: Path) -> list[dict]:
    """The base-model-plus-motion-adapter form, set up for AsyncDiff on one rank: every UNet tensor it holds must
    be on the run's device."""
    parts = build_tiny_animatediff(0)
    unet = UNet2DConditionModel(sample_size=LATENT_SIZE, block_out_channels=CHANNELS, down_block_types=DOWN_2D,
                                up_block_types=UP_2D, layers_per_block=2, cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    StableDiffusionPipeline(vae=parts.vae, text_encoder=parts.text_encoder, tokenizer=parts.tokenizer, unet=unet,
                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(root / "sd", safe_serialization=True)
    parts.motion_adapter.save_pretrained(root / "adapter", safe_serialization=True)
    misplaced = launch.run(_misplaced, 1, torch.device(device), root / "sd", root / "adapter", dtype, threads=1)
    return [{"check": "base model + motion adapter: UNet tensors off the run's device", "model": "tiny SD + adapter",
             "value": misplaced, "passed": misplaced == 0}]


def _misplaced(rank, folder: Path, adapter_folder: Path, dtype: str) -> int:
    staged = setup_asyncdiff(folder, adapter_for(folder), units_for, AsyncDiffConfig(stages=1, cost="flops"),
                             shape={"frames": 4, "height": 64, "width": 64}, device=rank.device,
                             dtype=getattr(torch, dtype), motion_adapter=adapter_folder, settings={})
    unet = staged.pipe.unet
    return sum(t.device.type != rank.device.type for _, t in [*unet.named_parameters(), *unet.named_buffers()])


def check_unit_times(device: str) -> list[dict]:
    rows = []
    for arch in ARCHS:
        seconds = cuda_unit_times(arch, torch.device(device))
        rows.append({"check": f"full-size {arch.name} step, float16, summed over {len(seconds)} units (s)",
                     "model": arch.name, "value": round(sum(seconds), 4), "passed": sum(seconds) > 0})
    return rows


def check_nccl(size, frames, steps) -> list[dict]:
    """AsyncDiff on two GPUs over NCCL against the oracle on one, then a rank killed mid-run."""
    rows = []
    request = request_for("tiny-animatediff", size, frames, steps)
    config = AsyncDiffConfig(stages=2, warmup=2, cost="flops")
    want = scheduled("tiny-animatediff", request, "cuda", "float16", config)
    got = launch.run(asyncdiff_sample, 2, torch.device("cuda"), "tiny-animatediff", request, config, torch.float16)
    rows.append(_row("AsyncDiff N=2 on NCCL vs the oracle on one GPU (float16)", "tiny-animatediff",
                     psnr(got.frames, want.frames), 60.0))
    rows.append(_killed_rank_ends_the_job())
    return rows


def _killed_rank_ends_the_job() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("a red circle moving left\n" * 4)
        cmd = [sys.executable, "-m", "asyncvid.cli.app", "generate", str(prompts), "--sampler", "asyncdiff",
               "--devices", "2", "--device", "cuda", "--steps", "200", "--out", str(Path(tmp) / "out")]
        log = Path(tmp) / "stderr.txt"
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        children = []
        for _ in range(120):  # up to 2 minutes for the workers to start and load
            time.sleep(1)
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            if proc.poll() is not None or len(children) >= 2:
                break
        time.sleep(5)  # sampling has begun (4 videos of 200 steps take far longer)
        if proc.poll() is not None or not children:
            return {"check": "a rank killed mid-run: the run ended before a rank could be killed",
                    "model": "tiny-animatediff", "value": None, "passed": False}
        os.kill(int(children[-1]), signal.SIGKILL)
        start = time.monotonic()
        try:
            proc.wait(timeout=30)
            ended = time.monotonic() - start
            message = (log.read_text().strip().splitlines() or [""])[-1]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            ended, message = None, "still running after 30 s"
    return {"check": f"a rank killed mid-run: every rank ends ({message})", "model": "tiny-animatediff",
            "value": ended, "passed": ended is not None and "rank" in message}


def _row(check: str, model: str, db: float, floor: float | None = FLOOR_DB) -> dict:
    return {"check": check, "model": model, "value": round(db, 2), "floor_db": floor,
            "passed": floor is None or db >= floor}


def run(device: str, out: Path, quick: bool) -> list[dict]:
    """Every check that fits the machine; writes gpu_check.json and gpu_check.md under `out`."""
    quiet_libraries()
    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible; use --device cpu")
    size, frames, steps = (64, 4, 3) if quick or not cuda else (256, 8, 10)
    dtypes = ("float16", "bfloat16") if cuda else ("bfloat16",)  # CPUs have no float16 convolutions
    rows = check_precision(device, dtypes, size, frames, steps)
    rows += check_schedule(device, dtypes, size, frames, steps)
    rows += check_parataa(device, dtypes[0], size, frames, steps)
    with tempfile.TemporaryDirectory() as tmp:
        rows += check_placement(device, dtypes[0], Path(tmp))
    if cuda:
        rows += check_unit_times(device)
        if torch.cuda.device_count() >= 2:
            rows += check_nccl(size, frames, steps)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"device": _device_name(device), "rows": rows}, indent=2))
    (out / "gpu_check.md").write_text(markdown(rows, _device_name(device)))
    return rows


def markdown(rows: list[dict], device: str) -> str:
    lines = [f"GPU check on {device} (`python -m asyncvid.bench.gpu_check`).", "",
             "| check | model | value | floor | passed |", "|---|---|---|---|---|"]
    for r in rows:
        floor = r.get("floor_db")
        lines.append(f"| {r['check']} | {r['model']} | {r['value']} | {'' if floor is None else floor} | "
                     f"{'yes' if r['passed'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}"
    return f"CPU, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asyncvid.bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (the same code at tiny sizes)")
    parser.add_argument("--out", type=Path, default=Path("outputs/gpu-check"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the GPU too")
    args = parser.parse_args(argv)
    rows = run(args.device, args.out, args.quick)
    print(markdown(rows, _device_name(args.device)))
    failed = [r["check"] for r in rows if not r["passed"]]
    if failed:
        print(f"{len(failed)} check(s) failed: {'; '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
