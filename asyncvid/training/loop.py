"""One training loop for every model: seeded, resumable from its last checkpoint, bounded by steps or minutes."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from asyncvid.errors import UsageError
from asyncvid.runtime.launch import cpu_threads


@dataclass
class TrainConfig:
    """Budget and optimiser settings of one run; the run stops at `steps` or after `minutes`, whichever is first."""

    workdir: Path
    steps: int = 100_000
    minutes: float = 25.0
    batch: int = 8
    lr: float = 5e-4
    warmup: int = 50
    seed: int = 0
    threads: int = 1
    ema: float = 0.995
    anneal: int = 0  # the last `anneal` steps of the budget decay the learning rate linearly to zero
    # (name part, gain): a parameter whose name contains the part trains at `gain` times the rate (the first match)
    lr_gains: tuple[tuple[str, float], ...] = ()
    checkpoint_every: int = 100
    resume: bool = True
    # (name, value): the settings the loss was built with (e.g. --shape-pairs); the checkpoint keeps them, and a
    # run asking for other values is refused rather than resumed as a mix of two recipes
    recipe: tuple[tuple[str, object], ...] = ()

    def __post_init__(self):
        self.workdir = Path(self.workdir)
        if self.steps < 1 or self.minutes <= 0:
            raise ValueError(f"steps ({self.steps}) and minutes ({self.minutes}) must be positive; raise the budget")
        if self.batch < 1:
            raise ValueError(f"batch must be at least 1, got {self.batch}")
        if not 0 <= self.ema < 1:
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}; 0 turns averaging off")
        if not 0 <= self.anneal <= self.steps:
            raise ValueError(f"anneal ({self.anneal}) must be between 0 and the step budget ({self.steps}); "
                             f"lower --anneal or raise --steps")
        for part, gain in self.lr_gains:
            if not gain > 0:
                raise ValueError(f"the learning-rate gain of {part!r} must be positive, got {gain}")

    def lr_at(self, step: int) -> float:
        """Learning rate of step `step` (0-based): linear warm-up, constant, then (with `anneal`) linear decay to
        zero at the step budget (a warmup-stable-decay schedule)."""
        scale = min(1.0, (step + 1) / self.warmup)
        if self.anneal:
            scale *= min(1.0, (self.steps - step) / self.anneal)
        return self.lr * scale

    @property
    def checkpoint(self) -> Path:
        return self.workdir / "checkpoint.pt"


LossFn = Callable[[torch.nn.Module, int, torch.Generator], torch.Tensor]  # (model, batch size, generator) -> loss


def train(model: torch.nn.Module, loss_fn: LossFn, config: TrainConfig, *, name: str) -> dict:
    """Optimise `model` in place with AdamW on `loss_fn`; returns the log. The averaged (EMA) weights are copied
    into `model` at the end. The checkpoint holds weights, averages, optimiser, step and generator state. Runs on
    `config.threads` CPU threads and gives the process its thread count back afterwards."""
    with cpu_threads(config.threads, torch.device("cpu")):
        return _train(model, loss_fn, config, name)


def _train(model, loss_fn, config, name) -> dict:
    config.workdir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    average = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = _gain_groups(model, config.lr_gains)
    opt = torch.optim.AdamW([{"params": group} for group in groups.values()], lr=config.lr, weight_decay=0.0)
    step, seconds, losses = 0, 0.0, []
    if config.resume and config.checkpoint.is_file():
        state = torch.load(config.checkpoint, weights_only=False)
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # e.g. a VAE checkpoint from before the r4 architecture
            raise UsageError(f"{config.checkpoint} holds a different model than {name} builds now "
                             f"({str(e).splitlines()[0]}); start over with --fresh or choose another --workdir") from None
        average.load_state_dict(state["average"])
        try:
            opt.load_state_dict(state["opt"])
        except ValueError:  # another split into learning-rate groups (lr_gains) than the checkpoint's
            raise UsageError(f"{config.checkpoint} was trained with other learning-rate gains than {name} asks for "
                             f"now; resume with the same gains, or start over with --fresh") from None
        _check_recipe(config, name, dict(state.get("recipe", ())))  # checkpoints from before it kept none
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        step, seconds, losses = state["step"], state["seconds"], state["losses"]
    model.train()
    start = time.perf_counter() - seconds
    columns = (TextColumn(f"[bold]{name}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns) as bar:
        task = bar.add_task(name, total=config.steps, completed=step, loss=float("nan"))
        while step < config.steps and time.perf_counter() - start < config.minutes * 60:
            for group, gain in zip(opt.param_groups, groups):
                group["lr"] = config.lr_at(step) * gain
            loss = loss_fn(model, config.batch, generator)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            decay = min(config.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for a, p in zip(average.parameters(), model.parameters()):
                    a.lerp_(p.detach(), 1 - decay)
            losses.append(loss.item())
            recent = losses[-50:]
            bar.update(task, completed=step, loss=sum(recent) / len(recent))
            if step % config.checkpoint_every == 0:
                bar.console.log(f"{name} step {step} loss {sum(recent) / len(recent):.4f}")
                _save(config, model, average, opt, generator, step, time.perf_counter() - start, losses)
    seconds = time.perf_counter() - start
    _save(config, model, average, opt, generator, step, seconds, losses)
    model.load_state_dict(average.state_dict())
    model.eval()
    log = {"name": name, "steps": step, "minutes": round(seconds / 60, 2), "final_loss": _mean_tail(losses),
           "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}}
    (config.workdir / "train_log.json").write_text(json.dumps(log, indent=2))
    return log


def _gain_groups(model: torch.nn.Module, gains) -> dict[float, list[torch.nn.Parameter]]:
    """The trained parameters by learning-rate gain (AdamW's steps ignore a gradient's scale, so a per-module rate
    must be a parameter group): one group, gain 1, without gains."""
    groups: dict[float, list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            gain = next((g for part, g in gains if part in name), 1.0)
            groups.setdefault(gain, []).append(param)
    return groups


def _mean_tail(losses: list[float], n: int = 100) -> float | None:
    tail = losses[-n:]
    return round(sum(tail) / len(tail), 5) if tail else None


def _check_recipe(config: TrainConfig, name: str, saved: dict) -> None:
    """Refuse to resume a checkpoint whose loss was built with other settings than this run's."""
    for key, value in config.recipe:
        if key in saved and saved[key] != value:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {value}: {name}'s checkpoint {config.checkpoint} was trained with {flag} "
                             f"{saved[key]}; resume with that, or start over with --fresh")


def _save(config, model, average, opt, generator, step, seconds, losses) -> None:
    """Write the checkpoint next to the old one and rename, so an interrupted save never loses the last one."""
    state = {"model": model.state_dict(), "average": average.state_dict(), "opt": opt.state_dict(),
             "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "step": step,
             "seconds": seconds, "losses": losses, "recipe": dict(config.recipe)}
    tmp = config.checkpoint.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(config.checkpoint)


def finish(model, config, log) -> None:
    """Save a finished (or time-limited) stage: its final weights and training log, and say which it is."""
    model.save_pretrained(config.workdir / "final")
    (config.workdir / "train_log.json").write_text(json.dumps(log, indent=2))
    typer.echo(f"{log['name']}: {log['steps']} steps in {log['minutes']} min, loss {log['final_loss']}")
    if log["steps"] < config.steps:  # the recipe is a step count: a time-limited model is a different, weaker one
        typer.echo(f"{log['name']}: stopped by the {config.minutes:g}-minute limit at step {log['steps']} of "
                   f"{config.steps}; run the same command with a larger --minutes to finish it", err=True)
