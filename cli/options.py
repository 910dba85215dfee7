"""The CLI's options, shared by its commands: choices as Enums, each option's help once (typer's Annotated types)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from asyncvid.parataa.config import ParaTAAConfig


class Format(str, Enum):
    mp4 = "mp4"
    gif = "gif"
    png = "png"


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


class Cost(str, Enum):
    flops = "flops"
    measured = "measured"


class Stale(str, Enum):
    extrapolate = "extrapolate"
    reuse = "reuse"


class Start(str, Enum):
    jump = "jump"
    noise = "noise"


PROCESSES, ASYNCDIFF = "Sampler and processes", "AsyncDiff"
DEFAULT_WARMUP = 3  # AsyncDiff's warm-up when --warmup is not given (capped at --steps)

Model = Annotated[str, typer.Option(metavar="NAME|FOLDER", help="Embedded name (see `asyncvid models`), a local diffusers folder, or a hub id in the local HF cache.")]
Steps = Annotated[int, typer.Option(help="Denoising steps.")]
Frames = Annotated[Optional[int], typer.Option(help="Frames per video \\[default: the model's].")]
Height = Annotated[Optional[int], typer.Option(help="Frame height, a multiple of 8 \\[default: the model's].")]
Width = Annotated[Optional[int], typer.Option(help="Frame width, a multiple of 8 \\[default: the model's].")]
Seed = Annotated[int, typer.Option(help="Random seed; the same seed and settings give the same frames.")]
Out = Annotated[Path, typer.Option(metavar="FOLDER", help="Output folder (created when the first video is written).")]
Fmt = Annotated[Format, typer.Option("--format", help="mp4 (H.264), gif, or png (a folder of lossless frames).")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace outputs that already exist.")]
Device = Annotated[Optional[str], typer.Option(metavar="DEVICE", help="cpu, cuda or cuda:N \\[default: cuda if available, else cpu].")]
DTypeOpt = Annotated[Optional[DType], typer.Option("--dtype", metavar="DTYPE", help="float32, float16 or bfloat16 \\[default: float16 on CUDA, float32 on CPU].")]
Debug = Annotated[bool, typer.Option("--debug", help="Show full tracebacks and library logs.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Also load weights stored as pickle files (.bin/.ckpt). A pickle can run code when loaded: only for weights you trust; sequential sampling and ParaTAA only.")]

Variant = Annotated[Optional[str], typer.Option("--variant", help="The form of the weights to load, e.g. fp16 (files named *.fp16.safetensors). Default: the plain files, or the one variant a download has.")]


class SchedulerName(str, Enum):
    euler = "euler"
    ddim = "ddim"
    dpm_solver = "dpm-solver"


SchedulerOpt = Annotated[Optional[SchedulerName], typer.Option("--scheduler", metavar="NAME", help="euler, ddim or dpm-solver: replace the pipeline's own scheduler (Euler for SVD, DDIM for AnimateDiff), keeping its noise schedule.")]


class Sampler(str, Enum):
    sequential = "sequential"
    asyncdiff = "asyncdiff"
    parataa = "parataa"


SamplerOpt = Annotated[Sampler, typer.Option(metavar="NAME", help="sequential; asyncdiff (UNet stages on --devices, all computing at once); or parataa (many steps per batched round, solved by fixed-point iteration, the batch split across --devices).", rich_help_panel=PROCESSES)]
Devices = Annotated[Optional[int], typer.Option(help="Processes to run (local workers started by asyncvid; under torchrun the launcher decides) \\[default: 1, or what --data-parallel needs; with --parallel auto, the GPUs or CPU cores here].", rich_help_panel=PROCESSES)]
DataParallel = Annotated[int, typer.Option("--data-parallel", metavar="D", help="Groups of the sampler's processes, each making whole videos of the batch (D videos at once): D x the sampler's processes in all.", rich_help_panel=PROCESSES)]


class Parallel(str, Enum):
    auto = "auto"


ParallelOpt = Annotated[Optional[Parallel], typer.Option("--parallel", metavar="auto", help="auto: the sampler and --data-parallel that finish this batch soonest on --devices, by the cost model (for one video, the fastest per video); `asyncvid plan --parallel auto` shows the choice.", rich_help_panel=PROCESSES)]
Stages = Annotated[int, typer.Option(help="AsyncDiff: UNet stages, one per device.", rich_help_panel=ASYNCDIFF)]
Stride = Annotated[int, typer.Option(help="AsyncDiff: steps per parallel round; needs stages + stride - 1 devices.", rich_help_panel=ASYNCDIFF)]
Warmup = Annotated[Optional[int], typer.Option(help="AsyncDiff: exact sequential steps first (= --steps reproduces sequential sampling) \\[default: 3, or --steps when fewer].", rich_help_panel=ASYNCDIFF)]
TimeShift = Annotated[bool, typer.Option("--time-shift", help="AsyncDiff: feed the stages the previous step's timestep after warm-up.", rich_help_panel=ASYNCDIFF)]
Threads = Annotated[Optional[int], typer.Option(help="CPU threads per process \\[default: this machine's cores shared evenly by the processes; on a busy machine the CLI suggests fewer]. The thread count changes float rounding on CPU.", rich_help_panel=PROCESSES)]
Refresh = Annotated[int, typer.Option(metavar="K", help="AsyncDiff: a synchronous step (like warm-up) every K steps after warm-up, bringing every stage's inputs back to the present; each costs about (stages - 1) stage forwards more than a round; 0: never (stride 1 only).", rich_help_panel=ASYNCDIFF)]
StaleOpt = Annotated[Stale, typer.Option("--stale", help="AsyncDiff: after warm-up each stage's inputs are one round old; extrapolate predicts them from the last two rounds (closer to sequential sampling), reuse takes them as they are (the paper's method).", rich_help_panel=ASYNCDIFF)]
CostOpt = Annotated[Cost, typer.Option("--cost", help="AsyncDiff: balance stages by unit times measured on rank 0 (measured) or by FLOPs (flops).", rich_help_panel=ASYNCDIFF)]
WeightCap = Annotated[float, typer.Option(help="AsyncDiff: most of the UNet's weights one stage may hold; 1 balances compute alone (fastest), lower saves memory.", rich_help_panel=ASYNCDIFF)]
CfgParallel = Annotated[bool, typer.Option("--cfg-parallel", help="AsyncDiff: the two halves of the guidance batch on two groups of ranks; needs (stages + stride - 1) x 2 devices.", rich_help_panel=ASYNCDIFF)]
Oversubscribe = Annotated[bool, typer.Option("--oversubscribe", help="Allow more processes than CPU cores (slower; to try a layout).", rich_help_panel=PROCESSES)]
Split = Annotated[Optional[str], typer.Option(metavar="UNIT,...", help="AsyncDiff: manual split, the first unit of each later stage, comma-separated (`asyncvid plan` lists the units).", rich_help_panel=ASYNCDIFF)]
PARATAA = ParaTAAConfig()  # the defaults shown in --help
Order = Annotated[Optional[int], typer.Option(help="ParaTAA: each step's equation unrolls this many sampler steps (1: Jacobi; >= window: Picard) \\[default: the window].", rich_help_panel="ParaTAA")]
Window = Annotated[Optional[int], typer.Option(help="ParaTAA: steps evaluated per round, in one batch \\[default: all steps].", rich_help_panel="ParaTAA")]
History = Annotated[int, typer.Option(help="ParaTAA: iterates kept per step for triangular Anderson acceleration (1: plain fixed-point iteration).", rich_help_panel="ParaTAA")]
Tol = Annotated[float, typer.Option(help="ParaTAA: a step is final when its residual is below this fraction of the sampler's noise scale at that step, or below --atol.", rich_help_panel="ParaTAA")]
Atol = Annotated[float, typer.Option(help="ParaTAA: a step is final when its residual (rms, latent units) is below this, or below --tol x its noise scale.", rich_help_panel="ParaTAA")]
SampleTol = Annotated[Optional[float], typer.Option(help="ParaTAA: stop once a round moves the sample by at most this (rms, latent units; tuned on the embedded models); 0 waits for every step to be final.", rich_help_panel="ParaTAA")]
StartOpt = Annotated[Start, typer.Option("--start", help="ParaTAA: the first trajectory: jump (every step from the first step's clean prediction; that round evaluates one step) or noise (every step a copy of the noise, the paper's).", rich_help_panel="ParaTAA")]
MaxBatch = Annotated[Optional[int], typer.Option(help="ParaTAA: model rows per call on each device, when a round's share does not fit in memory at once (more calls; the same result up to float rounding) \\[default: the whole share].", rich_help_panel="ParaTAA")]
MaxRounds = Annotated[Optional[int], typer.Option(help="ParaTAA: stop after this many rounds, converged or not \\[default: --steps].", rich_help_panel="ParaTAA")]
Eta = Annotated[float, typer.Option(help="ParaTAA with DDIM: 0 is deterministic; > 0 samples stochastically with all noise drawn up front.", rich_help_panel="ParaTAA")]
