"""AsyncDiff's stage-parallel UNet (Chen et al., NeurIPS 2024) as a removable diffusers hook.

Each rank runs the pipeline's own loop; the hook replaces the UNet's forward with the UNet's own forward computing
this rank's stage only (asyncvid.asyncdiff.stage). Warm-up steps relay the stages across
ranks one after another (exact). After warm-up, every stage runs at once in each round on the tensors that the
other stages produced one round earlier; the last stage's noise prediction is broadcast, so every rank takes the
same scheduler step. With stride S a round covers S steps: the S last-stage ranks each predict one of them. A stage
computes on its one-round-old inputs as they are or extrapolated from the round before (asyncvid.asyncdiff.stale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils._pytree import tree_leaves, tree_map

from asyncvid.asyncdiff.config import AsyncDiffConfig, Layout
from asyncvid.asyncdiff.plan import Plan, Transfer, transfers
from asyncvid.asyncdiff.stage import StageRunner
from asyncvid.asyncdiff.stale import predicted
from asyncvid.asyncdiff.units import Key, Program
from asyncvid.errors import UsageError
from asyncvid.models.devices import Stopwatch

HOOK_NAME = "asyncvid.asyncdiff"
_MAX_DIMS = 8
# A header announces a tensor before its first exchange: its dtype (an index into DTYPES), rank and shape.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class RunState:
    """Per-run state: cleared by `reset_state`, and whenever the UNet is called off the current run's schedule."""

    step: int = 0
    # The run's timesteps: the scheduler's from `offset` on (video-to-video starts part way down the schedule).
    offset: int = 0
    schedule: list[float] | None = None
    inputs: dict[Key, torch.Tensor] = field(default_factory=dict)  # this stage's inputs from the last round
    before: dict[Key, torch.Tensor] = field(default_factory=dict)  # and from the round before that
    shapes: dict[Key, tuple[torch.Size, torch.dtype]] = field(default_factory=dict)  # of what this rank receives
    out_shape: torch.Size | None = None
    out_dtype: torch.dtype | None = None  # of the noise prediction, from the last stage's header
    device: torch.device | None = None
    queued: dict[int, torch.Tensor] = field(default_factory=dict)  # noise predictions of later steps in a round
    bytes_sent: int = 0
    # Time inside the hook (this stage's compute plus waiting on the other ranks) and running this stage's units.
    hook_clock: Stopwatch = field(default_factory=Stopwatch)
    compute_clock: Stopwatch = field(default_factory=Stopwatch)

    @property
    def hook_s(self) -> float:
        return self.hook_clock.seconds

    @property
    def compute_s(self) -> float:
        return self.compute_clock.seconds


class AsyncDiffHook(ModelHook):
    """Runs this rank's stage of the UNet and exchanges boundary tensors with the other stages."""

    _is_stateful = True

    def __init__(self, runner: StageRunner, plan: Plan, config: AsyncDiffConfig, scheduler, group=None,
                 cfg: CfgSplit | None = None):
        super().__init__()
        self.runner, self.plan, self.config, self.scheduler, self.group = runner, plan, config, scheduler, group
        self.program: Program = runner.program
        self.cfg = cfg
        self.layout = Layout(config.stages, config.stride)
        self.rank = dist.get_rank(group)
        self.stage = self.layout.stage_of(self.rank)
        self.units = plan.units(self.stage)
        moves = _transfers_between_ranks(plan, self.program, self.layout)
        self.receives = [m for m in moves if m[2] == self.rank]  # (key, src rank, dst rank)
        self.sends = [m for m in moves if m[1] == self.rank]
        self.last = self.stage == config.stages - 1
        self.wanted = {key for key, _, _ in self.sends}
        self.state = RunState()

    def reset_state(self, module):
        self.state = RunState()
        return module

    def new_forward(self, module, *args, **kwargs):
        return_dict = kwargs.pop("return_dict", True)
        timestep = _timestep_value(args, kwargs)
        if not self._continues(timestep):
            # A new run: a new pipeline call (a user's pipeline resets no hooks), the one after an interrupted call,
            # or FreeInit's next loop within one call. Every rank sees the same timesteps, so all restart together.
            self.state = RunState(**_run_of(self.scheduler.timesteps, timestep))
        step = self.state.step
        self.state.step += 1
        if step == 0:  # the device is known once the UNet is called
            device = _device_of(args, kwargs)
            self.state.hook_clock, self.state.compute_clock = Stopwatch(device), Stopwatch(device)
        start = self.state.hook_clock.start()
        if step not in self.state.queued:
            if self.cfg is not None:
                args, kwargs = self.cfg.take_half(args, kwargs)
            found = [self._relay(args, kwargs)] if self.config.synchronous(step) else self._round(args, kwargs, step)
            if self.cfg is not None:
                found = [self.cfg.join_halves(eps) for eps in found]
            self.state.queued.update({step + j: eps for j, eps in enumerate(found)})
        eps = self.state.queued.pop(step)
        self.state.hook_clock.stop(start)
        return self.program.output_type(sample=eps) if return_dict else (eps,)

    def _continues(self, timestep: float) -> bool:
        """Whether the UNet is called at the current run's next timestep."""
        schedule, step = self.state.schedule, self.state.step
        return schedule is not None and step < len(schedule) and _same(schedule[step], timestep)

    # 1. Warm-up and refresh: the stages one after another, each rank waiting for its inputs (the sequential forward).
    def _relay(self, args, kwargs) -> torch.Tensor:
        first_time = self.state.out_shape is None
        self.state.device = _device_of(args, kwargs)
        received = self._receive(headers=first_time)
        self.state.before, self.state.inputs = self.state.inputs, dict(received)
        computes = self.layout.replica(self.rank) == 0
        out = self._run_stage(args, kwargs, received) if computes else None
        sends = self._exchange_out(out, headers=first_time) if computes else []
        src = self.layout.ranks_of(self.config.stages - 1)[0]
        eps = self._broadcast_eps(out if self.rank == src else None, src=src)
        _wait(sends)
        return eps

    # 2. After warm-up: all stages at once on the previous round's tensors; receive the next round's meanwhile.
    def _round(self, args, kwargs, step: int) -> list[torch.Tensor]:
        total = len(self.state.schedule)
        width = min(self.config.stride, total - step)  # steps in this round
        # Whether a later round consumes what this one sends (a relay next computes its own inputs).
        more = step + width < total and not self.config.synchronous(step + width)
        replica = self.layout.replica(self.rank)
        computes = self.stage < self.config.stages - 1 or replica < width
        pending, receiving = self._post_receives() if more else ({}, [])
        out = None
        if computes:
            offset = width - 1 if self.stage < self.config.stages - 1 else replica
            args, kwargs = _with_timestep(args, kwargs, self._timestep(step + offset))
            out = self._run_stage(args, kwargs, predicted(self.state.inputs, self.state.before, self.config.stale))
        sends = self._exchange_out(out, headers=False) if (more and computes) else []
        last = self.layout.ranks_of(self.config.stages - 1)
        eps = [self._broadcast_eps(out if self.rank == last[j] else None, src=last[j]) for j in range(width)]
        _wait(receiving)
        self.state.before, self.state.inputs = self.state.inputs, pending
        _wait(sends)
        return eps  # the noise predictions of steps step .. step + width - 1

    def _timestep(self, index: int):
        shift = 1 if self.config.time_shift else 0
        return self.scheduler.timesteps[self.state.offset + max(index - shift, 0)]

    def _run_stage(self, args, kwargs, received: dict[Key, torch.Tensor]):
        """The UNet's forward computing this stage's units on `received`; returns the noise prediction (the last
        stage) and the unit outputs other stages need."""
        start = self.state.compute_clock.start()
        out, produced = self.runner.run(self.fn_ref.original_forward, self.units, received, self.wanted, args,
                                        {**kwargs, "return_dict": False})
        self.state.compute_clock.stop(start)
        return (out[0] if self.last else None), produced

    # Point to point: untagged, every rank posting its sends and receives in the one global order of `transfers`, as
    # NCCL matches them (by issue order per pair of ranks, ignoring tags); gloo, which matches tags, checks the order.
    def _receive(self, *, headers: bool) -> dict[Key, torch.Tensor]:
        """This stage's inputs, waiting for them (the relay); their headers come first on the first step of a run."""
        if headers:
            bufs = {key: torch.empty(_MAX_DIMS + 2, dtype=torch.int64, device=self.state.device)
                    for key, _, _ in self.receives}
            _wait(self._batch([(dist.irecv, bufs[key], src) for key, src, _ in self.receives]))
            self.state.shapes = {key: _parse_header(buf) for key, buf in bufs.items()}
        out = {key: self._buffer(key) for key, _, _ in self.receives}
        _wait(self._batch([(dist.irecv, out[key], src) for key, src, _ in self.receives]))
        return out

    def _post_receives(self) -> tuple[dict[Key, torch.Tensor], list]:
        """Start receiving the next round's inputs, to overlap with this round's compute."""
        bufs = {key: self._buffer(key) for key, _, _ in self.receives}
        return bufs, self._batch([(dist.irecv, bufs[key], src) for key, src, _ in self.receives])

    def _buffer(self, key: Key) -> torch.Tensor:
        shape, dtype = self.state.shapes[key]  # the sender's dtype, which need not be the UNet input's
        return torch.empty(shape, dtype=dtype, device=self.state.device)

    def _exchange_out(self, out, *, headers: bool) -> list:
        produced = out[1]
        tensors = [produced[key].contiguous() for key, _, _ in self.sends]
        ops = [(dist.isend, _header(t), dst) for t, (_, _, dst) in zip(tensors, self.sends)] if headers else []
        ops += [(dist.isend, t, dst) for t, (_, _, dst) in zip(tensors, self.sends)]
        self.state.bytes_sent += sum(t.numel() * t.element_size() for t in tensors)
        return self._batch(ops)

    def _batch(self, ops) -> list:
        if not ops:
            return []
        return dist.batch_isend_irecv([dist.P2POp(op, tensor, group=self.group, group_peer=peer)
                                       for op, tensor, peer in ops])

    def _broadcast_eps(self, out, *, src: int) -> torch.Tensor:
        """The last stage's noise prediction, to every rank (its shape is learned once per run)."""
        if self.state.out_shape is None:
            # Shape and dtype once per run, on the compute device (NCCL moves GPU tensors only).
            header = _header(out[0]) if out is not None else torch.empty(_MAX_DIMS + 2, dtype=torch.int64,
                                                                           device=self.state.device)
            dist.broadcast(header, group=self.group, group_src=src)
            self.state.out_shape, self.state.out_dtype = _parse_header(header)
        eps = out[0].contiguous() if out is not None else torch.empty(
            self.state.out_shape, dtype=self.state.out_dtype, device=self.state.device
        )
        dist.broadcast(eps, group=self.group, group_src=src)
        return eps


@dataclass(frozen=True)
class CfgSplit:
    """Classifier-free guidance in parallel: this group of ranks runs half `index` of the guidance batch (0: the
    unconditional half, 1: the conditional one); `pair` links this rank with its counterpart in the other group."""

    index: int
    pair: object  # a process group of two ranks

    def take_half(self, args, kwargs):
        return tree_map(self._half, (tuple(args), dict(kwargs)))  # nested too: added_cond_kwargs, residuals

    def _half(self, value):
        if not torch.is_tensor(value) or value.dim() == 0:
            return value
        if value.shape[0] % 2:
            raise UsageError(
                f"--cfg-parallel splits the guidance batch in two, but the UNet got a batch of {value.shape[0]}; "
                f"use a guidance scale above 1 or drop --cfg-parallel"
            )
        return value.chunk(2)[self.index]

    def join_halves(self, eps: torch.Tensor) -> torch.Tensor:
        halves = [torch.empty_like(eps) for _ in range(2)]
        dist.all_gather(halves, eps.contiguous(), group=self.pair)
        return torch.cat(halves)


def _transfers_between_ranks(plan: Plan, program: Program, layout: Layout) -> list[tuple[Key, int, int]]:
    """(key, src rank, dst rank) for every stage transfer; the last stage's replicas each receive a copy."""
    moves: list[Transfer] = transfers(plan, program)
    return [(m.key, layout.ranks_of(m.src)[0], dst) for m in moves for dst in layout.ranks_of(m.dst)]


def _timestep_value(args, kwargs) -> float:
    timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
    return float(torch.as_tensor(timestep).flatten()[0])


def _same(a: float, b: float) -> bool:
    """Equal up to a half-precision cast of the timestep."""
    return abs(a - b) <= 1e-3 * max(1.0, abs(a))


def _run_of(timesteps, first: float) -> dict:
    """The run that starts at timestep `first`: the scheduler's timesteps from its first match on. A call off the
    schedule (the UNet called directly, at any timestep) is a run of one relay step: exact, with nothing to predict."""
    schedule = [float(t) for t in timesteps.tolist()] if timesteps is not None else []
    offset = next((i for i, t in enumerate(schedule) if _same(t, first)), None)
    if offset is None:
        return {"offset": 0, "schedule": None}
    return {"offset": offset, "schedule": schedule[offset:]}


def _device_of(args, kwargs) -> torch.device | None:
    return next((v.device for v in tree_leaves((args, kwargs)) if torch.is_tensor(v)), None)


def _with_timestep(args, kwargs, timestep):
    if "timestep" in kwargs:
        return args, {**kwargs, "timestep": timestep}
    return (args[0], timestep, *args[2:]), kwargs


def _pad_shape(shape) -> list[int]:
    return [len(shape), *shape] + [0] * (_MAX_DIMS - len(shape))


def _unpad_shape(t: torch.Tensor) -> torch.Size:
    n = int(t[0])
    return torch.Size(int(v) for v in t[1 : n + 1])


def _header(tensor: torch.Tensor) -> torch.Tensor:
    """dtype index, rank, shape (padded): what a receiver needs to allocate the tensor's buffer."""
    return torch.tensor([DTYPES.index(tensor.dtype), *_pad_shape(tensor.shape)], dtype=torch.int64,
                        device=tensor.device)


def _parse_header(header: torch.Tensor) -> tuple[torch.Size, torch.dtype]:
    return _unpad_shape(header[1:]), DTYPES[int(header[0])]


def _wait(works) -> None:
    for work in works:
        work.wait()


def apply_asyncdiff(unet, program: Program, plan: Plan, config: AsyncDiffConfig, scheduler, group=None,
                    cfg: CfgSplit | None = None):
    """Attach the hook (and the stage hooks on the units) to `unet`; returns it. `remove_asyncdiff(unet)` restores
    the original forward."""
    hook = AsyncDiffHook(StageRunner(unet, program), plan, config, scheduler, group, cfg)
    HookRegistry.check_if_exists_or_initialize(unet).register_hook(hook, HOOK_NAME)
    return hook


def remove_asyncdiff(unet) -> None:
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    hook = registry.get_hook(HOOK_NAME)
    if hook is not None:
        hook.runner.remove()
        registry.remove_hook(HOOK_NAME, recurse=False)
