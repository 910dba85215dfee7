"""What `asyncvid bench` measures, validated on construction (plain Python: a bad value fails before torch loads)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from asyncvid.errors import UsageError

STAGE_COUNTS = (2, 3, 4)
STRIDES = (1, 2)


@dataclass(frozen=True)
class BenchConfig:
    """What `asyncvid bench` measures; validated on construction."""

    models: tuple[str, ...] = ("tiny-svd", "tiny-animatediff")
    size: int = 128  # frame height and width (16x16 latents)
    frames: int = 8
    steps: int = 25
    warmups: tuple[int, ...] = (1, 3, 6)
    repeats: int = 3
    cfg_parallel: bool = True
    parataa: bool = True
    parataa_models: tuple[str, ...] | None = ("tiny-animatediff",)  # None: every model (slow on a CPU)
    device: str = "cpu"
    out: Path = Path("outputs/bench")  # the project's own docs/ is regenerated with an explicit --out docs
    adherence: bool = False
    adherence_only: bool = False  # refresh only the adherence section of an existing benchmarks.json
    repredict: bool = False  # re-measure the cost model's inputs and redo the predictions of an existing one
    adherence_model: str = "tiny-animatediff"  # a trained text-to-video model: adherence of random weights is noise
    adherence_prompts: int = 50
    adherence_warmups: tuple[int, ...] = (1, 3)
    adherence_parataa_prompts: int = 10
    link_gbps: float | None = None  # override the measured link for the projections (GB/s)
    link_latency_us: float | None = None
    busy: bool = True  # on a CPU, also time the units with every core computing (what a parallel run's ranks see)
    full_size: bool = True  # project to the full-size SVD-xt and AnimateDiff UNets
    plots: bool = True
    command: str = "asyncvid bench"

    def __post_init__(self):
        if self.size < 64 or self.size % 64:
            raise UsageError(f"size must be a multiple of 64 (parallel stages need latents divisible by 8), got "
                             f"{self.size}")
        if self.steps < 2 or self.frames < 1:
            raise UsageError(f"steps must be >= 2 and frames >= 1, got steps={self.steps}, frames={self.frames}")
        if self.repeats < 1:
            raise UsageError(f"repeats must be >= 1 (3 gives a median of 3 after a warm-up run), got {self.repeats}")
        bad = [w for w in self.warmups if not 1 <= w <= self.steps]
        if bad:
            raise UsageError(f"warm-ups must be between 1 and steps={self.steps}, got {bad}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UsageError(f"device must be cpu or cuda, got {self.device!r}")
