"""AsyncDiff's schedule in one process: the specification that the distributed hook (hook.py) must equal bit for bit.

Chen et al. (NeurIPS 2024), as asyncvid runs it. Warm-up steps (and refresh steps) run the stages one after another
(the sequential forward). From then on each round covers `stride` steps: every stage computes once, on what the stages before it
produced in the previous round; stages 0..N-2 use the timestep of the round's last step, and the last stage runs
once per step of the round (its replicas), each on the same inputs. With time shift, a round's stages take the
timestep one step earlier. Stages compute on their inputs as they are or extrapolated from the round before
(asyncvid.asyncdiff.stale). With CFG-parallel, each half of the guidance batch runs this schedule on its own.
No process group, no tags, no buffers: only the schedule.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_map

from asyncvid.asyncdiff.config import AsyncDiffConfig
from asyncvid.asyncdiff.plan import Plan, transfers
from asyncvid.asyncdiff.stage import StageRunner
from asyncvid.asyncdiff.stale import predicted
from asyncvid.asyncdiff.units import Key, Program

ORACLE_HOOK = "asyncvid.asyncdiff.oracle"


@dataclass
class Copy:
    """One copy of the staged UNet (one half of the guidance batch with CFG-parallel): each stage's inputs."""

    inputs: list[dict[Key, torch.Tensor]] = field(default_factory=list)  # per stage, from the last round
    before: list[dict[Key, torch.Tensor]] = field(default_factory=list)  # per stage, from the round before that


class OracleHook(ModelHook):
    """The UNet's forward replaced by AsyncDiff's schedule, every stage computed here in turn."""

    _is_stateful = True

    def __init__(self, runner: StageRunner, plan: Plan, config: AsyncDiffConfig, scheduler):
        super().__init__()
        self.runner, self.plan, self.config, self.scheduler = runner, plan, config, scheduler
        self.program: Program = runner.program
        self.moves = transfers(plan, self.program)
        self.reset_state(None)

    def reset_state(self, module):
        self.step = 0
        self.queued: dict[int, torch.Tensor] = {}
        self.copies = [Copy() for _ in range(2 if self.config.cfg_parallel else 1)]
        return module

    def new_forward(self, module, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        step, self.step = self.step, self.step + 1
        if step not in self.queued:
            halves = [_half(args, kwargs, i) for i in range(2)] if self.config.cfg_parallel else [(args, kwargs)]
            per_copy = [self._schedule(copy, a, k, step) for copy, (a, k) in zip(self.copies, halves)]
            for j, eps in enumerate(zip(*per_copy)):
                self.queued[step + j] = torch.cat(eps) if len(eps) > 1 else eps[0]
        eps = self.queued.pop(step)
        return self.program.output_type(sample=eps) if return_dict else (eps,)

    def _schedule(self, copy: Copy, args, kwargs, step: int) -> list[torch.Tensor]:
        if self.config.synchronous(step):
            return [self._sequential(copy, args, kwargs)]
        return self._round(copy, args, kwargs, step)

    def _sequential(self, copy: Copy, args, kwargs) -> torch.Tensor:
        """A warm-up step: stage k runs on what stages < k produced this step; the inputs are kept for round one."""
        copy.before, copy.inputs = copy.inputs, [{} for _ in range(self.plan.num_stages)]
        out = None
        for k in range(self.plan.num_stages):
            out = self._stage(k, args, kwargs, copy.inputs[k])
            self._deliver(k, out, copy.inputs)
        return out[0]

    def _round(self, copy: Copy, args, kwargs, step: int) -> list[torch.Tensor]:
        """Steps step .. step + width - 1 at once, every stage on the previous round's inputs."""
        total, last = len(self.scheduler.timesteps), self.plan.num_stages - 1
        width = min(self.config.stride, total - step)
        fresh = [{} for _ in range(self.plan.num_stages)]
        used = [predicted(copy.inputs[k], copy.before[k] if copy.before else {}, self.config.stale)
                for k in range(self.plan.num_stages)]
        eps = []
        for k in range(self.plan.num_stages):
            offsets = range(width) if k == last else [width - 1]
            for offset in offsets:
                shifted_args, shifted_kwargs = _with_timestep(args, kwargs, self._timestep(step + offset))
                out = self._stage(k, shifted_args, shifted_kwargs, used[k])
                if k == last:
                    eps.append(out[0])
                elif offset == width - 1:
                    self._deliver(k, out, fresh)
        if step + width < total and self.config.synchronous(step + width):
            fresh = [{} for _ in range(self.plan.num_stages)]  # a relay comes next: nothing is sent ahead to it
        copy.before, copy.inputs = copy.inputs, fresh
        return eps

    def _stage(self, k: int, args, kwargs, inputs: dict[Key, torch.Tensor]):
        """The UNet's forward computing stage k's units on its inputs (left as they are, for the stride replicas);
        (the forward's output, the unit outputs later stages take)."""
        wanted = {m.key for m in self.moves if m.src == k}
        out, produced = self.runner.run(self.fn_ref.original_forward, self.plan.units(k), inputs, wanted, args,
                                        {**kwargs, "return_dict": False})
        return (out[0] if out is not None else None), produced

    def _deliver(self, k: int, out, inputs: list[dict[Key, torch.Tensor]]) -> None:
        """What stage k sends: each unit output to the stage that takes it."""
        for move in self.moves:
            if move.src == k:
                inputs[move.dst][move.key] = out[1][move.key]

    def _timestep(self, index: int):
        shift = 1 if self.config.time_shift else 0
        return self.scheduler.timesteps[max(index - shift, 0)]


def _half(args, kwargs, index: int):
    def cut(value):
        return value.chunk(2)[index] if torch.is_tensor(value) and value.dim() > 0 else value

    return tree_map(cut, (tuple(args), dict(kwargs)))


def _with_timestep(args, kwargs, timestep):
    if "timestep" in kwargs:
        return args, {**kwargs, "timestep": timestep}
    return (args[0], timestep, *args[2:]), kwargs


def apply_oracle(unet, program: Program, plan: Plan, config: AsyncDiffConfig, scheduler) -> OracleHook:
    """Attach the single-process schedule to `unet` (which holds every stage's weights); `remove_oracle` undoes it."""
    hook = OracleHook(StageRunner(unet, program), plan, config, scheduler)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, ORACLE_HOOK)
    return hook


def remove_oracle(unet) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    hook = registry.get_hook(ORACLE_HOOK)
    if hook is not None:
        hook.runner.remove()
        registry.remove_hook(ORACLE_HOOK, recurse=False)
