"""ParaTAA's settings (Tang et al., ICML 2024): order k, window w, history m, tolerance, rounds, initialisation."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from asyncvid.errors import UsageError

STARTS = ("jump", "noise")


@dataclass(frozen=True)
class ParaTAAConfig:
    """How the triangular system over the trajectory is solved; validated on construction.

    A round evaluates the model on every step of the window at once (one batch, split across ranks). Order k
    unrolls each equation from k steps earlier (1: Jacobi; >= window: Picard). History m keeps m iterates per step for
    triangular Anderson acceleration (1: plain fixed-point iteration). A step is final when its residual is below
    `atol` or `tol` times the sampler's ancestral noise scale at that step (the paper's rule); the solve also stops
    once a round moves the sample by at most `sample_tol`. `start` is the first trajectory (asyncvid.parataa.solver).
    The paper's own settings: `start="noise", sample_tol=None`.
    """

    order: int | None = None  # None: the window (every equation unrolls from the window's first step)
    window: int | None = None  # None: all steps
    history: int = 2
    # The paper's stopping rule with its Stable Diffusion tolerances (1e-3 absolute, 1e-3 x the noise scale): strict,
    # so that frozen steps are accurate; `sample_tol` then ends the solve when the sample stops moving. At 50 steps
    # this takes 7 rounds to 52-53 dB from sequential sampling on both embedded models (docs/PARATAA.md).
    tol: float = 1e-3
    atol: float = 1e-3
    # rms, in latent units (tuned on the embedded models, whose latents have unit scale); None or 0: wait until every
    # step is final
    sample_tol: float | None = 0.06
    start: str = "jump"
    max_rounds: int | None = None  # None: as many as steps (ParaTAA never needs more)
    max_batch: int | None = None  # model rows per call on a rank (micro-batches; None: its whole share at once)
    eta: float = 0.0  # DDIM's eta; > 0 samples stochastically with noise drawn up front
    regularization: float = 1e-3  # ridge weight of Anderson's least squares, relative to its Gram matrix's scale
    variation_steps: int | None = None  # with an initial trajectory: solve only its last steps (None: all)

    def __post_init__(self):
        if self.order is not None and self.order < 1:
            raise UsageError(f"order must be at least 1, got {self.order}; use --order 1 (Jacobi) or more")
        if self.window is not None and self.window < 1:
            raise UsageError(f"window must be at least 1, got {self.window}; use --window 1 or more (default: all steps)")
        if self.history < 1:
            raise UsageError(f"history must be at least 1, got {self.history}; use --history 1 (no Anderson) or more")
        if not 0 < self.tol < float("inf"):
            raise UsageError(f"tol must be positive, got {self.tol}; use e.g. --tol {ParaTAAConfig.tol} (the default)")
        if not 0 <= self.atol < float("inf"):
            raise UsageError(f"atol must be >= 0, got {self.atol}; use e.g. --atol {ParaTAAConfig.atol} (the default)")
        if self.sample_tol == 0:  # 0, as on the command line: off
            object.__setattr__(self, "sample_tol", None)
        if self.sample_tol is not None and not 0 < self.sample_tol < float("inf"):
            raise UsageError(f"sample tol must be positive, or 0 to wait for every step, got {self.sample_tol}; use "
                             f"e.g. --sample-tol {ParaTAAConfig.sample_tol} (the default)")
        if self.start not in STARTS:
            raise UsageError(f"start must be one of {', '.join(STARTS)}, got {self.start!r}")
        if self.max_batch is not None and self.max_batch < 1:
            raise UsageError(f"max batch must be at least 1, got {self.max_batch}; use --max-batch 1 or more "
                             f"(default: a rank's whole share of the window at once)")
        if self.max_rounds is not None and self.max_rounds < 1:
            raise UsageError(f"max rounds must be at least 1, got {self.max_rounds}; use --max-rounds 1 or more")
        if not 0 <= self.eta <= 1:
            raise UsageError(f"eta must be in [0, 1], got {self.eta}; use --eta 0 (deterministic DDIM) up to 1")
        if self.regularization < 0:
            raise UsageError(f"regularization must be >= 0, got {self.regularization}")
        if self.variation_steps is not None and self.variation_steps < 1:
            raise UsageError(f"variation steps must be at least 1, got {self.variation_steps}")

    def check_world_size(self, world_size: int) -> None:
        """Any number of ranks works: each round's batch is split evenly (ranks beyond its rows only pad)."""
        if world_size < 1:
            raise UsageError(f"ParaTAA needs at least one process, got {world_size}")

    def check_steps(self, steps: int) -> None:
        """Limits that depend on the request's number of steps."""
        if self.variation_steps is not None and self.variation_steps > steps:
            raise UsageError(f"variation steps {self.variation_steps} exceed the {steps} steps; use at most {steps}")

    def window_for(self, steps: int) -> int:
        return min(self.window or steps, steps)

    def rounds_for(self, steps: int) -> int:
        return self.max_rounds or steps

    def describe(self) -> dict:
        return {"name": "parataa", **asdict(self)}
