"""The benchmark's measurements, each in a fresh process (so peak memory and timings are its own): sequential and
parallel samples, unit times for the cost model, and the link between two ranks."""

from __future__ import annotations

import functools
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import torch.distributed as dist

from asyncvid.asyncdiff.costs import fake_trace, measure_times
from asyncvid.asyncdiff.timing import measure_unit_costs
from asyncvid.bench.costmodel import ping_pong, split
from asyncvid.bench.measure import asyncdiff_sample, parataa_sample, sequential_sample
from asyncvid.pipelines import adapter_for, latent_shape, resolve_model, units_for
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import quiet_libraries


@dataclass(frozen=True)
class Entry:
    """One configuration of the grid: a sampler (None: sequential) on `processes` ranks of `threads` threads."""

    label: str
    kind: str  # "sequential", "asyncdiff", "cfg-parallel" or "parataa"
    processes: int
    threads: int
    config: object = None

    @property
    def warmup(self) -> int | None:
        return getattr(self.config, "warmup", None) if self.kind == "asyncdiff" else None


def isolated(fn, *args):
    """`fn(*args)` in a process of its own (not a daemon, so it may start rank processes of its own)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=launch.start_context()) as pool:
        return pool.submit(fn, *args).result()


def run_entry(entry: Entry, model: str, request, device: torch.device, repeats: int):
    """The Sample of one configuration (median of `repeats` after a warm-up run), in a fresh process."""
    return isolated(_run_entry, entry, model, request, device, repeats)


def _run_entry(entry: Entry, model: str, request, device: torch.device, repeats: int):
    quiet_libraries()
    if entry.kind == "sequential":
        with launch.cpu_threads(entry.threads, device):
            return sequential_sample(model, request, device=device, repeats=repeats)
    fn = parataa_sample if entry.kind == "parataa" else asyncdiff_sample
    return launch.run(fn, entry.processes, device, model, request, entry.config, torch.float32, repeats,
                      threads=entry.threads)


def unit_costs(model: str, request, device: torch.device, threads: int, stage_counts) -> dict:
    """Per-unit seconds of the model's UNet (random weights, the request's shape, batches 2 and 1, `threads`
    threads), FLOPs, and the stage split a run would make for each stage count; in a fresh process."""
    return isolated(_unit_costs, model, request, device, threads, tuple(stage_counts))


def _unit_costs(model, request, device, threads, stage_counts) -> dict:
    quiet_libraries()
    folder = resolve_model(model)
    adapter = adapter_for(folder)
    unet = adapter.unet_skeleton(folder)
    family = units_for(unet)
    shape = latent_shape(folder, request.num_frames, request.height, request.width)
    example = functools.partial(family.example_inputs, **shape)
    traced = fake_trace(unet, family, shape)
    profiles, program = traced.profiles, traced.program
    with launch.cpu_threads(threads, device):
        # The split a run makes: balanced on the times asyncdiff.setup measures (or reuses from its cache).
        balance = measure_unit_costs(unet, family, shape, device, torch.float32)
        batch2 = fresh_unit_times(unet, family, example, device)
        batch1 = fresh_unit_times(unet, family, functools.partial(example, batch=1), device)
    eps = profiles[-1].out_bytes
    stages = {n: split(profiles, batch2, program, n, eps, balance_on=balance) for n in stage_counts}
    return {"names": [p.name for p in profiles], "flops": [p.flops for p in profiles], "unit_s": batch2,
            "unit_s_batch1": batch1, "eps_bytes": eps, "stages": stages}


def fresh_unit_times(unet, family, example, device) -> list[float]:
    """Seconds per unit of a random-weight copy of `unet`, measured now (never from the cost cache)."""
    model = type(unet).from_config(unet.config).to(device=device).eval()
    args, kwargs = example(model)
    return measure_times(model, family.build_program(model), tuple(a.to(device) for a in args), kwargs)


def busy_unit_costs(model: str, request, device: torch.device, ranks: int) -> dict:
    """Per-unit seconds (batches 2 and 1) timed on `ranks` 1-thread ranks at once, as the stages of a parallel run
    compute: on a CPU the ranks share caches and memory bandwidth; rank 0's times, in fresh processes."""
    return isolated(_busy, model, request, device, ranks)


def _busy(model, request, device, ranks):
    return launch.run(_busy_rank, ranks, device, model, request, threads=1)


def _busy_rank(rank, model, request):
    folder = resolve_model(model)
    unet = adapter_for(folder).unet_skeleton(folder)
    family = units_for(unet)
    example = functools.partial(family.example_inputs,
                                **latent_shape(folder, request.num_frames, request.height, request.width))
    dist.barrier()  # start together, so every measurement overlaps the others
    out = {"unit_s": fresh_unit_times(unet, family, example, rank.device),
           "unit_s_batch1": fresh_unit_times(unet, family, functools.partial(example, batch=1), rank.device)}
    dist.barrier()
    return out


def link(device: torch.device):
    """(message sizes, one-way seconds) between two local ranks over the backend a run uses (gloo on the CPU)."""
    return isolated(_link, device)


def _link(device):
    return launch.run(ping_pong, 2, device, threads=1)
