"""`asyncvid`: text-to-video (`generate`), image-to-video (`i2v`), and what models are available (`models`)."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from asyncvid import __version__
from asyncvid.errors import UsageError
from asyncvid.parataa_config import ParaTAAConfig

app = typer.Typer(
    help="Generate videos with diffusion models (AnimateDiff, Stable Video Diffusion), sequentially or in parallel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class Format(str, Enum):
    mp4 = "mp4"
    gif = "gif"
    png = "png"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def _version(value: bool):
    if value:
        typer.echo(f"asyncvid {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = None,
):
    """Generate videos with diffusion models, sequentially or in parallel across devices."""


Model = Annotated[str, typer.Option(help="Embedded name (see `asyncvid models`), a local diffusers folder, or a hub id in the local HF cache.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Frames = Annotated[Optional[int], typer.Option(help="Frames per video \\[default: the model's].")]
Height = Annotated[Optional[int], typer.Option(help="Frame height, a multiple of 8 \\[default: the model's].")]
Width = Annotated[Optional[int], typer.Option(help="Frame width, a multiple of 8 \\[default: the model's].")]
Seed = Annotated[int, typer.Option(help="Random seed; the same seed and settings give the same frames.")]
Out = Annotated[Path, typer.Option(help="Output folder (created if missing).")]
Fmt = Annotated[Format, typer.Option("--format", help="mp4 (H.264), gif, or png (a folder of lossless frames).")]
Overwrite = Annotated[bool, typer.Option(help="Replace outputs that already exist.")]
Device = Annotated[Optional[str], typer.Option(help="cpu, cuda or cuda:N \\[default: cuda if available, else cpu].")]
DTypeOpt = Annotated[Optional[DType], typer.Option("--dtype", help="\\[default: float16 on CUDA, float32 on CPU]")]
Debug = Annotated[bool, typer.Option(help="Show full tracebacks and library logs.")]
AllowPickle = Annotated[bool, typer.Option(help="Also load weights stored as pickle files (.bin/.ckpt). A pickle can run code when loaded: only for weights you trust; sequential sampling and ParaTAA only.")]


class SchedulerName(str, Enum):
    euler = "euler"
    ddim = "ddim"
    dpm_solver = "dpm-solver"


SchedulerOpt = Annotated[Optional[SchedulerName], typer.Option("--scheduler", help="Replace the pipeline's own scheduler (Euler for SVD, DDIM for AnimateDiff), keeping its noise schedule.")]


class Sampler(str, Enum):
    sequential = "sequential"
    asyncdiff = "asyncdiff"
    parataa = "parataa"


SamplerOpt = Annotated[Sampler, typer.Option(help="sequential; asyncdiff (UNet stages on --devices, all computing at once); or parataa (many steps per batched round, solved by fixed-point iteration, the batch split across --devices).", rich_help_panel="Parallel sampling")]
Devices = Annotated[int, typer.Option(help="Processes to run (local workers started by asyncvid; under torchrun the launcher decides).", rich_help_panel="Parallel sampling")]
Stages = Annotated[int, typer.Option(help="AsyncDiff: UNet stages, one per device.", rich_help_panel="Parallel sampling")]
Stride = Annotated[int, typer.Option(help="AsyncDiff: steps per parallel round; needs stages + stride - 1 devices.", rich_help_panel="Parallel sampling")]
Warmup = Annotated[int, typer.Option(help="AsyncDiff: exact sequential steps first (= --steps reproduces sequential sampling).", rich_help_panel="Parallel sampling")]
TimeShift = Annotated[bool, typer.Option(help="AsyncDiff: feed the stages the previous step's timestep after warm-up.", rich_help_panel="Parallel sampling")]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads per process \\[default: the cores shared evenly by the processes]. The thread count changes float rounding on CPU.", rich_help_panel="Parallel sampling")]
CostOpt = Annotated[str, typer.Option("--cost", help="AsyncDiff: balance stages by unit times measured on rank 0 (measured) or by FLOPs (flops).", rich_help_panel="Parallel sampling")]
WeightCap = Annotated[float, typer.Option(help="AsyncDiff: most of the UNet's weights one stage may hold; 1 balances compute alone (fastest), lower saves memory.", rich_help_panel="Parallel sampling")]
CfgParallel = Annotated[bool, typer.Option(help="AsyncDiff: the two halves of the guidance batch on two groups of ranks; needs (stages + stride - 1) x 2 devices.", rich_help_panel="Parallel sampling")]
Oversubscribe = Annotated[bool, typer.Option(help="Allow more processes than CPU cores (slower; to try a layout).", rich_help_panel="Parallel sampling")]
Split = Annotated[Optional[str], typer.Option(help="AsyncDiff: manual split, the first unit of each later stage, comma-separated (see `asyncvid plan`).", rich_help_panel="Parallel sampling")]
_PARATAA = ParaTAAConfig()  # the defaults shown in --help
Order = Annotated[Optional[int], typer.Option(help="ParaTAA: each step's equation unrolls this many sampler steps (1: Jacobi; >= window: Picard) \\[default: the window].", rich_help_panel="ParaTAA")]
Window = Annotated[Optional[int], typer.Option(help="ParaTAA: steps evaluated per round, in one batch \\[default: all steps].", rich_help_panel="ParaTAA")]
History = Annotated[int, typer.Option(help="ParaTAA: iterates kept per step for triangular Anderson acceleration (1: plain fixed-point iteration).", rich_help_panel="ParaTAA")]
Tol = Annotated[float, typer.Option(help="ParaTAA: a step is final when its residual is below this fraction of the sampler's noise scale at that step.", rich_help_panel="ParaTAA")]
MaxRounds = Annotated[Optional[int], typer.Option(help="ParaTAA: stop after this many rounds, converged or not \\[default: --steps].", rich_help_panel="ParaTAA")]
Eta = Annotated[float, typer.Option(help="ParaTAA with DDIM: 0 is deterministic; > 0 samples stochastically with all noise drawn up front.", rich_help_panel="ParaTAA")]


def _sampler(sampler: Sampler, stages: int, stride: int, warmup: int, time_shift: bool, split: Optional[str],
             cfg_parallel: bool, cost: str, weight_cap: float, parataa: dict):
    from asyncvid.asyncdiff_config import AsyncDiffConfig

    if sampler is Sampler.sequential:
        return None
    if sampler is Sampler.parataa:
        return ParaTAAConfig(**parataa)
    return AsyncDiffConfig(stages=stages, stride=stride, warmup=warmup, time_shift=time_shift,
                           split=tuple(s.strip() for s in split.split(",")) if split else None,
                           cfg_parallel=cfg_parallel, cost=cost, weight_cap=weight_cap)


@app.command()
def generate(
    prompt_file: Annotated[Path, typer.Argument(help="Text file: one prompt per line, '#' starts a comment line.")],
    model: Model = "tiny-animatediff",
    motion_adapter: Annotated[Optional[str], typer.Option(help="AnimateDiff motion adapter folder or cached hub id (needed with a Stable Diffusion base model).")] = None,
    steps: Steps = 25,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 disables it) \\[default: the model's own (sampling.json in its folder; tiny-animatediff: 2.5), else 7.5].")] = None,
    negative_prompt: Annotated[str, typer.Option(help="What the video should not show.")] = "",
    seed: Seed = 0,
    fps: Annotated[int, typer.Option(help="Frames per second of the written video.")] = 8,
    out: Out = Path("outputs"),
    fmt: Fmt = Format.mp4,
    overwrite: Overwrite = False,
    device: Device = None,
    dtype: DTypeOpt = None,
    scheduler: SchedulerOpt = None,
    sampler: SamplerOpt = Sampler.sequential,
    devices: Devices = 1,
    stages: Stages = 2,
    stride: Stride = 1,
    warmup: Warmup = 3,
    time_shift: TimeShift = False,
    cfg_parallel: CfgParallel = False,
    split: Split = None,
    cost: CostOpt = "measured",
    weight_cap: WeightCap = 1.0,
    order: Order = None,
    window: Window = None,
    history: History = _PARATAA.history,
    tol: Tol = _PARATAA.tol,
    max_rounds: MaxRounds = None,
    eta: Eta = 0.0,
    threads: Threads = None,
    oversubscribe: Oversubscribe = False,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
):
    """Text-to-video (AnimateDiff): one video per prompt in PROMPT_FILE."""
    from asyncvid.naming import output_stem, read_prompts
    from asyncvid.requests import TextToVideo

    def build():
        from asyncvid.sources import recommended_guidance

        prompts = read_prompts(prompt_file)
        scale = recommended_guidance(model) if guidance is None else guidance
        requests = [
            TextToVideo(p, negative_prompt=negative_prompt, num_frames=frames, height=height, width=width,
                        num_inference_steps=steps, guidance_scale=scale, seed=seed, fps=fps)
            for p in prompts
        ]
        return requests, [output_stem(i, p) for i, p in enumerate(prompts)]

    _run(build, "text-to-video", model=model, motion_adapter=motion_adapter, out=out, fmt=fmt.value,
         overwrite=overwrite, device=device, dtype=dtype, debug=debug, devices=devices, threads=threads,
         oversubscribe=oversubscribe, scheduler=scheduler, allow_pickle=allow_pickle,
         sampler=lambda: _sampler(sampler, stages, stride, warmup, time_shift, split, cfg_parallel, cost, weight_cap,
                                 dict(order=order, window=window, history=history, tol=tol, max_rounds=max_rounds, eta=eta)))


@app.command()
def i2v(
    images: Annotated[list[Path], typer.Argument(help="Conditioning images (PNG or JPEG), one video each.")],
    model: Model = "tiny-svd",
    steps: Steps = 25,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    motion_bucket_id: Annotated[int, typer.Option(help="SVD's motion conditioning: higher moves more.")] = 127,
    noise_aug_strength: Annotated[float, typer.Option(help="Noise added to the conditioning image.")] = 0.02,
    min_guidance: Annotated[float, typer.Option(help="Guidance scale at the first frame.")] = 1.0,
    max_guidance: Annotated[float, typer.Option(help="Guidance scale at the last frame.")] = 3.0,
    decode_chunk_size: Annotated[Optional[int], typer.Option(help="Frames decoded at once \\[default: all].")] = None,
    seed: Seed = 0,
    fps: Annotated[int, typer.Option(help="Frames per second: SVD's conditioning and the written video's rate.")] = 7,
    out: Out = Path("outputs"),
    fmt: Fmt = Format.mp4,
    overwrite: Overwrite = False,
    device: Device = None,
    dtype: DTypeOpt = None,
    scheduler: SchedulerOpt = None,
    sampler: SamplerOpt = Sampler.sequential,
    devices: Devices = 1,
    stages: Stages = 2,
    stride: Stride = 1,
    warmup: Warmup = 3,
    time_shift: TimeShift = False,
    cfg_parallel: CfgParallel = False,
    split: Split = None,
    cost: CostOpt = "measured",
    weight_cap: WeightCap = 1.0,
    order: Order = None,
    window: Window = None,
    history: History = _PARATAA.history,
    tol: Tol = _PARATAA.tol,
    max_rounds: MaxRounds = None,
    threads: Threads = None,
    oversubscribe: Oversubscribe = False,
    allow_pickle: AllowPickle = False,
    debug: Debug = False,
):
    """Image-to-video (Stable Video Diffusion): one video per IMAGE."""
    from asyncvid.naming import output_stem
    from asyncvid.requests import ImageToVideo

    def build():
        from asyncvid.pipelines.svd import load_image  # imports diffusers: only after logs are quietened

        requests = []
        for image in images:
            load_image(image)  # fail on a bad image before the model loads
            requests.append(ImageToVideo(
                image, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                min_guidance_scale=min_guidance, max_guidance_scale=max_guidance, motion_bucket_id=motion_bucket_id,
                noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size, seed=seed, fps=fps,
            ))
        return requests, [output_stem(i, image.stem) for i, image in enumerate(images)]

    _run(build, "image-to-video", model=model, motion_adapter=None, out=out, fmt=fmt.value,
         overwrite=overwrite, device=device, dtype=dtype, debug=debug, devices=devices, threads=threads,
         oversubscribe=oversubscribe, scheduler=scheduler, allow_pickle=allow_pickle,
         sampler=lambda: _sampler(sampler, stages, stride, warmup, time_shift, split, cfg_parallel, cost, weight_cap,
                                 dict(order=order, window=window, history=history, tol=tol, max_rounds=max_rounds)))


class Cost(str, Enum):
    flops = "flops"
    measured = "measured"


@app.command()
def plan(
    model: Model = "tiny-svd",
    stages: Annotated[int, typer.Option(help="Stages to split the UNet into.")] = 2,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    cost: Annotated[Cost, typer.Option(help="Balance by FLOPs, or by unit times measured here (random weights).")] = Cost.flops,
    weight_cap: Annotated[float, typer.Option(help="Most of the UNet's weights one stage may hold (1: balance compute only).")] = 1.0,
    split: Split = None,
    motion_adapter: Annotated[Optional[str], typer.Option(help="Motion adapter, with a Stable Diffusion base model.")] = None,
    device: Device = None,
    debug: Debug = False,
):
    """Print how AsyncDiff splits a model's UNet: each stage's units, cost share, weights, and the tensors that cross."""
    _quiet_libraries(debug)
    try:
        from asyncvid.asyncdiff_setup import describe_plan

        typer.echo(describe_plan(model, stages, frames=frames, height=height, width=width, cost=cost.value,
                                 weight_cap=weight_cap, split=tuple(s.strip() for s in split.split(",")) if split else None,
                                 motion_adapter=motion_adapter, device=device))
    except UsageError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


@app.command()
def bench(
    models: Annotated[str, typer.Option(help="Models to benchmark, comma-separated (names or folders).")] = "tiny-svd,tiny-animatediff",
    size: Annotated[int, typer.Option(help="Frame height and width (a multiple of 64).")] = 128,
    frames: Annotated[int, typer.Option(help="Frames per video.")] = 8,
    steps: Steps = 25,
    warmups: Annotated[str, typer.Option(help="AsyncDiff warm-up steps to try, comma-separated.")] = "1,3,6",
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration (after one warm-up run); the median is reported.")] = 3,
    parataa: Annotated[bool, typer.Option(help="Include ParaTAA on 2 ranks.")] = True,
    device: Annotated[str, typer.Option(help="cpu, or cuda: unit times for the projections measured on CUDA.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Folder for BENCHMARKS.md, benchmarks.json and the plots.")] = Path("docs"),
    adherence: Annotated[bool, typer.Option(help="Also score adherence on the held-out prompts (tiny-animatediff).")] = False,
    adherence_only: Annotated[bool, typer.Option(help="Refresh only the adherence section of an existing benchmarks.json.")] = False,
    adherence_prompts: Annotated[int, typer.Option(help="Held-out prompts to score per configuration.")] = 50,
    repredict: Annotated[bool, typer.Option(help="Re-measure the cost model's inputs and redo the predictions of an existing benchmarks.json.")] = False,
    link_gbps: Annotated[Optional[float], typer.Option(help="Project with this link bandwidth (GB/s) instead of the measured one.")] = None,
    link_latency_us: Annotated[Optional[float], typer.Option(help="Project with this link latency (µs) instead of the measured one.")] = None,
    debug: Debug = False,
):
    """Benchmark parallel samplers against sequential sampling here, and project them to more devices and full-size models."""
    _quiet_libraries(debug)
    try:
        from asyncvid.bench import BenchConfig, run_bench

        config = BenchConfig(
            models=tuple(m.strip() for m in models.split(",") if m.strip()), size=size, frames=frames, steps=steps,
            warmups=tuple(int(w) for w in warmups.split(",")), repeats=repeats, parataa=parataa, device=device,
            out=out, adherence=adherence, adherence_only=adherence_only, adherence_prompts=adherence_prompts,
            repredict=repredict,
            link_gbps=link_gbps, link_latency_us=link_latency_us, command="asyncvid bench " + " ".join(sys.argv[2:]))
        run_bench(config, log=typer.echo)
    except (UsageError, ValueError) as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


@app.command()
def models():
    """List the embedded models and explain how to use real weights."""
    _quiet_libraries(False)
    from asyncvid.pipelines import EMBEDDED

    typer.echo("Embedded models (no download needed):")
    for m in EMBEDDED.values():
        typer.echo(f"  {m.name:<18} {m.task:<15} {m.description}")
    typer.echo(
        "\nReal weights: pass --model a local diffusers folder or a hub id already in the Hugging Face cache, e.g.\n"
        "  asyncvid i2v photo.png --model stabilityai/stable-video-diffusion-img2vid-xt --height 576 --width 1024\n"
        "  asyncvid generate prompts.txt --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\\n"
        "      --motion-adapter guoyww/animatediff-motion-adapter-v1-5-2 --height 512 --width 512\n"
        "asyncvid never downloads: fill the cache with `hf download <id>` on a connected machine. Safetensors only."
    )


def _run(build, task, *, model, motion_adapter, out, fmt, overwrite, device, dtype, debug, devices, threads,
         oversubscribe, scheduler, sampler, allow_pickle=False):
    """Validate everything before the model loads or a process starts, then hand the job to the library."""
    _quiet_libraries(debug)
    _show_usage_warnings()
    try:
        from asyncvid.devices import resolve_device, resolve_dtype
        from asyncvid.jobs import Job, run_job
        from asyncvid.outputs import plan_targets, prepare_out_dir

        requests, stems = build()
        config = sampler()
        if devices < 1:
            raise UsageError(f"devices must be at least 1, got {devices}")
        if threads is not None and threads < 1:
            raise UsageError(f"threads must be at least 1, got {threads}")
        if config is None and devices > 1 and not _external():
            raise UsageError(f"--devices {devices} needs a parallel sampler; add --sampler asyncdiff or drop --devices")
        if config is None and _external() and _external_world() > 1:
            raise UsageError(
                f"sequential sampling runs in one process, but the launcher started {_external_world()}; "
                f"add --sampler asyncdiff (stages + stride - 1 = {_external_world()}) or launch one process"
            )
        if config is not None:
            config.check_world_size(devices if not _external() else _external_world())
        dtype_name = dtype.value if dtype else None
        resolve_dtype(dtype_name, resolve_device(device))
        from asyncvid.asyncdiff_config import AsyncDiffConfig
        from asyncvid.sources import preflight

        if allow_pickle and isinstance(config, AsyncDiffConfig):
            raise UsageError("--allow-pickle works with --sampler sequential or parataa only (AsyncDiff reads each "
                             "stage's weights from safetensors); convert the weights to safetensors")
        # In this process, before any worker starts.
        preflight(model, task, requests, motion_adapter=motion_adapter, allow_pickle=allow_pickle)
        # Existing outputs are not refused here: run_job skips those whose sidecar has the same settings.
        targets = plan_targets(prepare_out_dir(out), stems, fmt, overwrite=True)
        job = Job(task, model, requests, targets, fmt=fmt, overwrite=overwrite, motion_adapter=motion_adapter,
                  device=device, dtype=dtype_name, sampler=config, devices=devices, quiet=not debug,
                  threads=threads, oversubscribe=oversubscribe, scheduler=scheduler.value if scheduler else None,
                  allow_pickle=allow_pickle)
        run_job(job)
    except UsageError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)
    except KeyboardInterrupt:  # the workers are already gone and no partial file is left
        typer.echo("interrupted", err=True)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # now: freeing torch's modules at interpreter exit takes seconds
    except RuntimeError as err:  # a rank died (RankFailed) or some videos failed (JobFailed)
        from asyncvid.jobs import JobFailed
        from asyncvid.pool import RankFailed

        if debug or not isinstance(err, (JobFailed, RankFailed)):
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1)


def _external() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _external_world() -> int:
    return int(os.environ["WORLD_SIZE"])


def _show_usage_warnings() -> None:
    """asyncvid's warnings to the user (a truncated prompt, pickle weights) print as one `warning: ...` line."""
    from asyncvid.requests import UsageWarning

    default = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UsageWarning):
            typer.echo(f"warning: {message}", err=True)
        else:
            default(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _quiet_libraries(debug: bool) -> None:
    """Hide library warnings and loading bars unless --debug: the CLI prints its own progress."""
    if not debug:
        from asyncvid.jobs import quiet_libraries

        quiet_libraries()
        logging.getLogger("torch.distributed").setLevel(logging.ERROR)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
