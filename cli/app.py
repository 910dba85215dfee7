"""`asyncvid`: text-to-video (`generate`), image-to-video (`i2v`), and what models are available (`models`)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from asyncvid import __version__
from asyncvid.cli.options import (
    DEFAULT_WARMUP, PARATAA, AllowPickle, Atol, CfgParallel, Cost, CostOpt, DataParallel, Debug, Device, Devices, DTypeOpt, Eta, Fmt, Format,
    Frames, Height, History, MaxBatch, MaxRounds, Model, Order, Out, Oversubscribe, Overwrite, Parallel, ParallelOpt, Refresh, Sampler,
    SampleTol, SamplerOpt, SchedulerOpt, Seed, Split, Stages, Stale, StaleOpt, Start, StartOpt, Steps, Stride, Variant, Threads,
    TimeShift, Tol, Warmup, WeightCap, Width, Window
)
from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.bench.config import BenchConfig
from asyncvid.cli.group import Command, Group
from asyncvid.cli.run import quiet_libraries, run, sampler_config
from asyncvid.errors import UsageError
from asyncvid.requests import ImageToVideo, TextToVideo

# Check the request before the model's own settings are read (the same ranges apply).
PROVISIONAL = dict(guidance_scale=7.5, shared_noise=0.0, noise_mean=1.0, shared_grid=1, max_guidance_scale=3.0)


def _models_own(model: str, unset: list[str]):
    """`run`'s finish: the requests with the settings the user left unset taken from the model's sampling.json."""

    def finish(requests):
        if not unset:
            return requests
        from asyncvid.pipelines import recommended_sampling  # diffusers: imported once the logs are quiet

        own = recommended_sampling(model)
        return [dataclasses.replace(r, **{name: getattr(own, name) for name in unset}) for r in requests]

    return finish


app = typer.Typer(
    cls=Group,
    help="Generate videos with diffusion models (AnimateDiff, Stable Video Diffusion), sequentially or in parallel.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


@app.command(cls=Command)
def generate(
    prompt_file: Annotated[Path, typer.Argument(metavar="PROMPT_FILE", show_default=False, help="Text file: one prompt per line, '#' starts a comment line.")],
    model: Model = "tiny-animatediff",
    motion_adapter: Annotated[Optional[str], typer.Option(help="AnimateDiff motion adapter folder or cached hub id (needed with a Stable Diffusion base model).")] = None,
    lora: Annotated[Optional[list[str]], typer.Option(metavar="PATH[:SCALE]", show_default=False, help="A LoRA (a .safetensors file, or a folder saved by diffusers), motion LoRAs too, fused into the weights at SCALE \\[default: 1]; repeat for several, fused in order.")] = None,
    steps: Steps = 25,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    guidance: Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale (1 disables it) \\[default: the model's own (sampling.json in its folder; tiny-animatediff: 2.5), else 7.5].")] = None,
    shared_noise: Annotated[Optional[float], typer.Option(help="Share of each frame's initial noise that all frames have in common, and all of their noise means (PYoCo's mixed noise prior: a steadier background); 0 draws every frame's noise on its own, 1 gives every frame the same noise \\[default: the model's own (sampling.json; tiny-animatediff: 1), else 0].")] = None,
    noise_mean: Annotated[Optional[float], typer.Option(help="Scale of each frame's initial noise mean: 1 as drawn, 0 zero-mean noise, so the seed does not choose the background's brightness \\[default: the model's own (sampling.json; tiny-animatediff: 0), else 1].")] = None,
    shared_grid: Annotated[Optional[int], typer.Option(help="The frames also share their initial noise's means over each cell of a G x G grid of the latent frame, its coarsest pattern (FreeInit's low frequencies: a steadier background); 1 shares only the whole frame's mean \\[default: the model's own (sampling.json), else 1; nothing left to share at --shared-noise 1].")] = None,
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
    devices: Devices = None,
    data_parallel: DataParallel = 1,
    parallel: ParallelOpt = None,
    stages: Stages = 2,
    stride: Stride = 1,
    warmup: Warmup = None,
    time_shift: TimeShift = False,
    stale: StaleOpt = Stale.extrapolate,
    refresh: Refresh = 0,
    cfg_parallel: CfgParallel = False,
    split: Split = None,
    cost: CostOpt = Cost.measured,
    weight_cap: WeightCap = 1.0,
    order: Order = None,
    window: Window = None,
    history: History = PARATAA.history,
    tol: Tol = PARATAA.tol,
    atol: Atol = PARATAA.atol,
    sample_tol: SampleTol = PARATAA.sample_tol,
    start: StartOpt = Start(PARATAA.start),
    max_rounds: MaxRounds = None,
    max_batch: MaxBatch = None,
    eta: Eta = 0.0,
    threads: Threads = None,
    oversubscribe: Oversubscribe = False,
    allow_pickle: AllowPickle = False,
    variant: Variant = None,
    debug: Debug = False,
):
    """Text-to-video (AnimateDiff): one video per prompt in PROMPT_FILE."""
    from asyncvid.video.naming import output_stem, read_prompts  # numpy, PIL: not at --help time

    chosen = dict(guidance_scale=guidance, shared_noise=shared_noise, noise_mean=noise_mean,
                  shared_grid=shared_grid)  # None: the model's own
    unset = [name for name, value in chosen.items() if value is None]

    def build():
        prompts = read_prompts(prompt_file)
        # Checked now with stand-ins for unset settings; `finish` puts in the model's own once the model is known.
        settings = {name: PROVISIONAL[name] if value is None else value for name, value in chosen.items()}
        requests = [
            TextToVideo(p, negative_prompt=negative_prompt, num_frames=frames, height=height, width=width,
                        num_inference_steps=steps, seed=seed, fps=fps, **settings)
            for p in prompts
        ]
        return requests, [output_stem(i, p) for i, p in enumerate(prompts)]

    run(build, "text-to-video", model=model, motion_adapter=motion_adapter, out=out, fmt=fmt.value,
        finish=_models_own(model, unset),
         overwrite=overwrite, device=device, dtype=dtype, debug=debug, devices=devices, data_parallel=data_parallel,
         parallel=parallel, threads=threads,
         oversubscribe=oversubscribe, scheduler=scheduler, allow_pickle=allow_pickle, variant=variant, loras=lora,
         sampler=lambda: sampler_config(sampler, stages, stride, warmup, time_shift, split, cfg_parallel, cost, weight_cap,
                                 dict(order=order, window=window, history=history, tol=tol, atol=atol, sample_tol=sample_tol,
                                      start=start.value, max_rounds=max_rounds, max_batch=max_batch, eta=eta), steps, stale=stale.value,
                                 refresh=refresh))


@app.command(cls=Command)
def i2v(
    images: Annotated[list[Path], typer.Argument(metavar="IMAGE", show_default=False, help="Conditioning images (PNG or JPEG), one video each.")],
    model: Model = "tiny-svd",
    steps: Steps = 25,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    motion_bucket_id: Annotated[int, typer.Option(help="SVD's motion conditioning: higher moves more.")] = 127,
    noise_aug_strength: Annotated[float, typer.Option(help="Noise added to the conditioning image.")] = 0.02,
    min_guidance: Annotated[float, typer.Option(help="Guidance scale at the first frame.")] = 1.0,
    max_guidance: Annotated[Optional[float], typer.Option(help="Guidance scale at the last frame \\[default: the model's own (sampling.json in its folder; tiny-svd: 2), else 3].")] = None,
    shared_noise: Annotated[Optional[float], typer.Option(help="Share of each frame's initial noise that all frames have in common, and all of their noise means (PYoCo's mixed noise prior: a steadier background); 0 draws every frame's noise on its own, 1 gives every frame the same noise \\[default: the model's own (sampling.json), else 0].")] = None,
    noise_mean: Annotated[Optional[float], typer.Option(help="Scale of each frame's initial noise mean: 1 as drawn, 0 zero-mean noise, so the seed does not choose the background's brightness \\[default: the model's own (sampling.json), else 1].")] = None,
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
    devices: Devices = None,
    data_parallel: DataParallel = 1,
    parallel: ParallelOpt = None,
    stages: Stages = 2,
    stride: Stride = 1,
    warmup: Warmup = None,
    time_shift: TimeShift = False,
    stale: StaleOpt = Stale.extrapolate,
    refresh: Refresh = 0,
    cfg_parallel: CfgParallel = False,
    split: Split = None,
    cost: CostOpt = Cost.measured,
    weight_cap: WeightCap = 1.0,
    order: Order = None,
    window: Window = None,
    history: History = PARATAA.history,
    tol: Tol = PARATAA.tol,
    atol: Atol = PARATAA.atol,
    sample_tol: SampleTol = PARATAA.sample_tol,
    start: StartOpt = Start(PARATAA.start),
    max_rounds: MaxRounds = None,
    max_batch: MaxBatch = None,
    threads: Threads = None,
    oversubscribe: Oversubscribe = False,
    allow_pickle: AllowPickle = False,
    variant: Variant = None,
    debug: Debug = False,
):
    """Image-to-video (Stable Video Diffusion): one video per IMAGE."""
    from asyncvid.video.naming import output_stem  # numpy, PIL: not at --help time

    chosen = dict(max_guidance_scale=max_guidance, shared_noise=shared_noise, noise_mean=noise_mean)  # None: own
    unset = [name for name, value in chosen.items() if value is None]

    def build():
        from asyncvid.video.images import load_image  # PIL: not at --help time

        # Checked now with stand-ins for unset settings; `finish` puts in the model's own once the model is known.
        settings = {name: PROVISIONAL[name] if value is None else value for name, value in chosen.items()}
        if max_guidance is None:
            settings["max_guidance_scale"] = max(min_guidance, PROVISIONAL["max_guidance_scale"])
        requests = []
        for image in images:
            load_image(image)  # fail on a bad image before the model loads
            requests.append(ImageToVideo(
                image, num_frames=frames, height=height, width=width, num_inference_steps=steps,
                min_guidance_scale=min_guidance, motion_bucket_id=motion_bucket_id,
                noise_aug_strength=noise_aug_strength, decode_chunk_size=decode_chunk_size, seed=seed, fps=fps,
                **settings,
            ))
        return requests, [output_stem(i, image.stem) for i, image in enumerate(images)]

    run(build, "image-to-video", model=model, motion_adapter=None, out=out, fmt=fmt.value,
        finish=_models_own(model, unset),
         overwrite=overwrite, device=device, dtype=dtype, debug=debug, devices=devices, data_parallel=data_parallel,
         parallel=parallel, threads=threads,
         oversubscribe=oversubscribe, scheduler=scheduler, allow_pickle=allow_pickle, variant=variant,
         sampler=lambda: sampler_config(sampler, stages, stride, warmup, time_shift, split, cfg_parallel, cost, weight_cap,
                                 dict(order=order, window=window, history=history, tol=tol, atol=atol, sample_tol=sample_tol,
                                      start=start.value, max_rounds=max_rounds, max_batch=max_batch), steps, stale=stale.value,
                                 refresh=refresh))


@app.command(cls=Command)
def plan(
    model: Model = "tiny-svd",
    stages: Annotated[int, typer.Option(help="Stages to split the UNet into.")] = 2,
    frames: Frames = None,
    height: Height = None,
    width: Width = None,
    cost: Annotated[Cost, typer.Option(help="Balance by FLOPs, or by unit times measured here (random weights).")] = Cost.flops,
    weight_cap: Annotated[float, typer.Option(help="Most of the UNet's weights one stage may hold (1: balance compute only).")] = 1.0,
    split: Annotated[Optional[str], typer.Option(metavar="UNIT,...", help="Manual split: the first unit of each later stage, comma-separated, from the units this command lists.")] = None,
    motion_adapter: Annotated[Optional[str], typer.Option(help="Motion adapter, with a Stable Diffusion base model.")] = None,
    variant: Variant = None,
    device: Device = None,
    dtype: DTypeOpt = None,
    parallel: Annotated[Optional[Parallel], typer.Option("--parallel", metavar="auto", help="auto: instead of the split, every layout of --videos on --devices with its predicted time per video and for the batch, best first (what `generate --parallel auto` would run).")] = None,
    videos: Annotated[int, typer.Option(help="With --parallel auto: videos in the batch.")] = 1,
    devices: Annotated[Optional[int], typer.Option(help="With --parallel auto: devices to lay out \\[default: the GPUs, or CPU cores, here].")] = None,
    steps: Annotated[int, typer.Option(help="With --parallel auto: denoising steps per video.")] = 25,
    debug: Debug = False,
):
    """Print how AsyncDiff splits a model's UNet: each stage's units, cost share, weights, and the tensors that cross."""
    try:
        if parallel is not None:
            return _plan_layouts(model, videos, devices, steps, frames, height, width, motion_adapter, device,
                                 dtype.value if dtype else None, debug, variant)
        units = tuple(s.strip() for s in split.split(",")) if split else None
        AsyncDiffConfig(stages=stages, cost=cost.value, weight_cap=weight_cap, split=units)  # checked before torch
        quiet_libraries(debug)
        from asyncvid.runtime.loaders import describe_plan  # torch, diffusers: not at --help time

        typer.echo(describe_plan(model, stages, frames=frames, height=height, width=width, cost=cost.value,
                                 weight_cap=weight_cap, split=units, motion_adapter=motion_adapter, device=device,
                                 dtype=dtype.value if dtype else None, variant=variant))
    except UsageError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


def _plan_layouts(model, videos, devices, steps, frames, height, width, motion_adapter, device, dtype, debug,
                  variant=None) -> None:
    """`asyncvid plan --parallel auto`: the cost model's table of layouts."""
    from types import SimpleNamespace

    for name, value in (("videos", videos), ("steps", steps), ("devices", 1 if devices is None else devices)):
        if value < 1:
            raise UsageError(f"--{name} must be at least 1, got {value}")
    quiet_libraries(debug)
    from asyncvid.models.devices import resolve_device  # torch, diffusers: not at --help time
    from asyncvid.runtime.auto import table

    request = SimpleNamespace(num_frames=frames, height=height, width=width, num_inference_steps=steps)
    choices = table(model, [request] * videos, devices=devices, device=resolve_device(device), dtype=dtype,
                    motion_adapter=motion_adapter, warmup=DEFAULT_WARMUP, variant=variant)
    typer.echo(f"{model}: {videos} video{'s' * (videos != 1)} of {steps} steps, predicted denoising loops "
               f"(transfers, decoding and encoding left out), best first:")
    for i, choice in enumerate(choices):
        typer.echo(f"  {'*' if i == 0 else ' '} {choice.describe(videos)}")


@app.command(cls=Command)
def bench(
    models: Annotated[str, typer.Option(help="Models to benchmark, comma-separated (names or folders).")] = "tiny-svd,tiny-animatediff",
    size: Annotated[int, typer.Option(help="Frame height and width (a multiple of 64).")] = 128,
    frames: Annotated[int, typer.Option(help="Frames per video.")] = 8,
    steps: Steps = 25,
    warmups: Annotated[str, typer.Option(help="AsyncDiff warm-up steps to try, comma-separated.")] = "1,3,6",
    repeats: Annotated[int, typer.Option(help="Timed runs per configuration (after one warm-up run); the median is reported.")] = 3,
    parataa: Annotated[bool, typer.Option(help="Include ParaTAA on 2 ranks.")] = True,
    device: Annotated[str, typer.Option(help="cpu, or cuda: unit times for the projections measured on CUDA.")] = "cpu",
    out: Annotated[Path, typer.Option(help="Folder for BENCHMARKS.md, benchmarks.json and the plots (the project's own: --out docs).")] = Path("outputs/bench"),
    adherence: Annotated[bool, typer.Option(help="Also score adherence on the held-out prompts (tiny-animatediff).")] = False,
    adherence_only: Annotated[bool, typer.Option(help="Refresh only the adherence section of an existing benchmarks.json.")] = False,
    adherence_prompts: Annotated[int, typer.Option(help="Held-out prompts to score per configuration.")] = 50,
    repredict: Annotated[bool, typer.Option(help="Re-measure the cost model's inputs and redo the predictions of an existing benchmarks.json.")] = False,
    link_gbps: Annotated[Optional[float], typer.Option(help="Project with this link bandwidth (GB/s) instead of the measured one.")] = None,
    link_latency_us: Annotated[Optional[float], typer.Option(help="Project with this link latency (µs) instead of the measured one.")] = None,
    debug: Debug = False,
):
    """Benchmark parallel samplers against sequential sampling here, and project them to more devices and full-size models."""
    try:
        config = BenchConfig(
            models=tuple(m.strip() for m in models.split(",") if m.strip()), size=size, frames=frames, steps=steps,
            warmups=_whole_numbers("--warmups", warmups), repeats=repeats, parataa=parataa, device=device,
            out=out, adherence=adherence, adherence_only=adherence_only, adherence_prompts=adherence_prompts,
            repredict=repredict,
            link_gbps=link_gbps, link_latency_us=link_latency_us, command="asyncvid bench " + " ".join(sys.argv[2:]))
        quiet_libraries(debug)
        from asyncvid.bench.suite import run_bench  # torch, diffusers: not at --help time

        run_bench(config, log=typer.echo)
    except UsageError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2)


def _whole_numbers(option: str, text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise UsageError(f"{option} takes whole numbers separated by commas, got '{text}'; e.g. {option} 1,3,6") from None


@app.command(cls=Command)
def models():
    """List the embedded models and explain how to use real weights."""
    quiet_libraries(False)
    from asyncvid.pipelines import EMBEDDED  # diffusers: not at --help time

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
