"""`asyncvid bench` (or `python -m asyncvid.bench`): parallel samplers against sequential sampling on one model and
the same seed, side by side, with a cost model that projects them to more devices and to full-size UNets.

Each configuration runs in a fresh process: a warm-up run, then the median of `repeats` runs. Rows hold loop and
end-to-end times, speedups against sequential sampling on 1 thread (one device-equivalent) and on every core, peak
memory and bytes sent per rank, PSNR and SSIM against the same-seed sequential output, ParaTAA's rounds, and the cost
model's prediction. Writes docs/benchmarks.json, docs/BENCHMARKS.md and PNG plots.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch

from asyncvid.bench import costmodel
from asyncvid.bench import runs as bench_runs
from asyncvid.bench.adherence import adherence_section
from asyncvid.bench.archs import ARCHS, cuda_unit_times, project
from asyncvid.bench.config import STAGE_COUNTS, STRIDES, BenchConfig
from asyncvid.bench.grid import grid, request_for
from asyncvid.bench.report import check_plotting, write_report
from asyncvid.bench.runs import Entry
from asyncvid.errors import UsageError
from asyncvid.eval.fidelity import compare
from asyncvid.runtime import launch
from asyncvid.runtime.loaders import quiet_libraries


@dataclass
class CostInputs:
    """What the cost model knows about one model on this device: per-step seconds and bytes, and the link."""

    prologue_s: float  # of a UNet call, outside its units (every stage runs it)
    unit_s: list[float]  # batch of 2 (classifier-free guidance)
    unit_s_batch1: list[float]
    other_s: float  # of the sequential loop, outside the UNet: encoding and scheduler steps
    stages: dict  # stage count -> costmodel.Stages (unit times only; the prologue is added per stage)
    eps_bytes: int
    link: costmodel.Link
    steps: int
    busy: float = 1.0  # unit times with every core computing / alone (batch of 2): a parallel run's slowdown
    busy_batch1: float = 1.0

    def stages_for(self, n: int) -> costmodel.Stages:
        """The split of a parallel run, each stage computing as fast as a core does while the others compute."""
        s = self.stages[n]
        return costmodel.Stages(tuple(self.busy * (c + self.prologue_s) for c in s.compute_s), s.weight_bytes,
                                s.crossing, s.eps_bytes)

    def relay_s(self, n: int, stride: int = 1) -> float:
        """A warm-up step: one stage computes at a time (alone, no contention), and every rank's prologue overlaps
        the earlier stages, so it is the sequential UNet plus the relay's transfers."""
        return self.prologue_s + costmodel.asyncdiff_relay(self.stages[n], self.link, stride)

    def loop(self, n: int, stride: int, warmup: int) -> float:
        return costmodel.asyncdiff_loop(self.stages_for(n), self.link, steps=self.steps, warmup=warmup,
                                        stride=stride, other_s=self.other_s, relay_s=self.relay_s(n, stride))

    def predict(self, entry: Entry, windows: list[int] | None = None, branches: int = 2) -> float | None:
        """Predicted loop seconds of a grid entry on 1-thread ranks (None for multi-threaded sequential)."""
        if entry.kind == "sequential":
            return self.other_s + self.steps * (self.prologue_s + sum(self.unit_s)) if entry.threads == 1 else None
        if entry.kind == "asyncdiff":
            return self.loop(entry.config.stages, entry.config.stride, entry.config.warmup)
        if entry.kind == "cfg-parallel":
            half = self.busy_batch1 * (self.prologue_s + sum(self.unit_s_batch1))
            return self.other_s + self.steps * costmodel.cfg_parallel_step(half, self.eps_bytes, self.link)
        return self.parataa(windows, branches, entry.processes)

    def parataa(self, windows: list[int], branches: int, devices: int) -> float:
        return costmodel.parataa_loop(windows, branches, self.busy_batch1 * (self.prologue_s + sum(self.unit_s_batch1)),
                                      self.eps_bytes // 2, self.link, devices, self.other_s)


def row(model: str, entry: Entry, run, one, every, steps: int, predicted: float | None) -> dict:
    """One table row: timings, speedups, fidelity against the 1-thread sequential output, memory, bytes, rounds."""
    fidelity = compare(run.frames, one.frames) if run is not one else {"psnr_db": None, "ssim": None}
    return {
        "model": model, "config": entry.label, "kind": entry.kind, "processes": entry.processes,
        "threads_per_process": entry.threads, "warmup": entry.warmup,
        "loop_s": round(run.loop_s, 3), "end_to_end_s": round(run.end_s, 3),
        "speedup_vs_1_thread": round(one.loop_s / run.loop_s, 3),
        "speedup_vs_all_threads": round(every.loop_s / run.loop_s, 3),
        "end_to_end_speedup_vs_1_thread": round(one.end_s / run.end_s, 3),
        "psnr_db": None if fidelity["psnr_db"] is None else round(fidelity["psnr_db"], 2),
        "ssim": None if fidelity["ssim"] is None else round(fidelity["ssim"], 4),
        "peak_mib_per_rank": [round(b / 2**20) for b in run.peak_bytes],
        "mib_sent_per_step_per_rank": [round(b / steps / 2**20, 3) for b in run.bytes_sent] or [0.0],
        "weight_share_per_rank": [round(w, 2) for w in run.weight_share] or [1.0],
        "busy_share_per_rank": [round(c, 2) for c in run.compute_share],
        "parataa": run.parataa or None,
        "predicted_loop_s": None if predicted is None else round(predicted, 3),
        "prediction_error": None if predicted is None else round(costmodel.error(predicted, run.loop_s), 3),
    }


def bench_model(model: str, config: BenchConfig, device: torch.device, link: costmodel.Link, log) -> dict:
    """Rows, cost inputs and projections for one model."""
    request = request_for(model, config)
    cores = launch.threads_per_process(1)
    units, busy = _unit_times(model, request, config, device, cores)
    entries = grid(config, cores, model)
    samples = {}
    for entry in entries[:2]:
        samples[entry.label] = bench_runs.run_entry(entry, model, request, device, config.repeats)
    one, every = (samples[e.label] for e in entries[:2])
    costs = _cost_inputs(units, busy, link, config, one.loop_s, one.unet_s)
    rows = []
    for entry in entries:
        run = samples.get(entry.label) or bench_runs.run_entry(entry, model, request, device, config.repeats)
        rows.append(row(model, entry, run, one, every, config.steps, None))
        _predict_row(rows[-1], entry, costs)
        log(json.dumps(rows[-1]))
    return {"request": request.describe(), "rows": rows, "cost_inputs": _describe_costs(costs, units),
            "projection": project_tiny(costs, one.loop_s, config)}


def _unit_times(model, request, config, device, cores):
    units = bench_runs.unit_costs(model, request, device, 1, STAGE_COUNTS)
    measure_busy = config.busy and device.type == "cpu" and cores >= 2
    return units, (bench_runs.busy_unit_costs(model, request, device, 2) if measure_busy else units)


def _cost_inputs(units, busy, link, config, loop_s: float, unet_s: float) -> CostInputs:
    """The cost model's inputs from unit times and the sequential 1-thread run's loop and UNet seconds."""
    return CostInputs(prologue_s=max(unet_s / config.steps - sum(units["unit_s"]), 0.0), unit_s=units["unit_s"],
                      unit_s_batch1=units["unit_s_batch1"], other_s=loop_s - unet_s, stages=units["stages"],
                      eps_bytes=units["eps_bytes"], link=link, steps=config.steps,
                      busy=sum(busy["unit_s"]) / sum(units["unit_s"]),
                      busy_batch1=sum(busy["unit_s_batch1"]) / sum(units["unit_s_batch1"]))


def _predict_row(r: dict, entry: Entry, costs: CostInputs) -> None:
    """Fill a row's predicted loop, its error, and ParaTAA's projection to more devices."""
    windows = [w["window"][1] - w["window"][0] for w in r["parataa"]["per_round"]] if r["parataa"] else None
    branches = r["parataa"]["branches"] if r["parataa"] else 2
    predicted = costs.predict(entry, windows, branches)
    r["predicted_loop_s"] = None if predicted is None else round(predicted, 3)
    r["prediction_error"] = None if predicted is None else round(costmodel.error(predicted, r["loop_s"]), 3)
    if windows:
        r["parataa_projection_s"] = {n: round(costs.parataa(windows, branches, n), 3)
                                     for n in sorted({1, 2, 4, 8, max(windows) * branches})}


def repredict(config: BenchConfig, log) -> dict:
    """Re-measure the cost model's inputs (link, unit times) and redo every prediction and projection of an existing
    benchmarks.json, keeping its measured rows."""
    path = Path(config.out) / "benchmarks.json"
    if not path.is_file():
        raise UsageError(f"no {path} to re-predict; run `asyncvid bench` first")
    result = json.loads(path.read_text())
    device = torch.device(config.device)
    cores = launch.threads_per_process(1)
    link, result["link"] = measured_link(config, device, log)
    rates = {}
    for model, stored in result["models"].items():
        request = request_for(model, config)
        units, busy = _unit_times(model, request, config, device, cores)
        one = stored["rows"][0]
        costs = _cost_inputs(units, busy, link, config, one["loop_s"], one["loop_s"] - stored["cost_inputs"]["other_s"])
        entries = {e.label: e for e in grid(config, cores, model)}
        for r in stored["rows"]:
            _predict_row(r, entries[r["config"]], costs)
        stored["cost_inputs"] = _describe_costs(costs, units)
        stored["projection"] = project_tiny(costs, one["loop_s"], config)
        rates["svd" if stored["request"]["task"] == "image-to-video" else "animatediff"] = \
            stored["cost_inputs"]["flops_per_step"] / stored["cost_inputs"]["unit_s_sum"]
    if result["full_size"]:
        rates.setdefault("svd", next(iter(rates.values())))
        rates.setdefault("animatediff", rates["svd"])
        result["full_size"] = project_full_size(device, link, rates, log)
    result["meta"]["command"] += f" && {config.command}"
    write_report(result, config)
    return result


def _describe_costs(costs: CostInputs, units: dict) -> dict:
    return {"unit_s_sum": round(sum(costs.unit_s), 5), "unit_s_batch1_sum": round(sum(costs.unit_s_batch1), 5),
            "prologue_s": round(costs.prologue_s, 5), "other_s": round(costs.other_s, 4),
            "busy_slowdown": round(costs.busy, 3), "busy_slowdown_batch1": round(costs.busy_batch1, 3),
            "eps_bytes": costs.eps_bytes, "units": len(units["names"]), "flops_per_step": sum(units["flops"])}


def project_tiny(costs: CostInputs, sequential_loop_s: float, config: BenchConfig) -> list[dict]:
    """AsyncDiff at N = 2..4 stages and stride 1..2 on 1-thread devices like this machine's cores, warm-up 3."""
    out = []
    for n in STAGE_COUNTS:
        stages = costs.stages_for(n)
        for s in STRIDES:
            loop = costs.loop(n, s, 3)
            out.append({"stages": n, "stride": s, "devices": n + s - 1,
                        "step_ms": round(1000 * costmodel.asyncdiff_round(stages, costs.link, s) / s, 2),
                        "loop_s": round(loop, 3), "speedup_vs_1_thread": round(sequential_loop_s / loop, 2)})
    return out


def project_full_size(device: torch.device, link: costmodel.Link, rates: dict, log) -> list[dict]:
    """Step latency of SVD-xt and AnimateDiff at N = 2..4, S = 1..2: on CUDA from unit times measured in float16 at
    a small size (scaled by FLOPs); on the CPU from FLOPs at the rate the tiny model of the same family reached."""
    out = []
    for arch in ARCHS:
        if device.type == "cuda":
            unit_s, rate, source, element = cuda_unit_times(arch, device), None, "measured on CUDA, float16", 2
        else:
            unit_s, rate, element = None, rates[arch.family], 4
            source = f"FLOPs at {rate / 1e9:.1f} GFLOP/s (the tiny {arch.family} model's rate on 1 CPU thread), float32"
        profiles, unit_s, stages = project(arch, STAGE_COUNTS, unit_s=unit_s, rate=rate, element_bytes=element)
        sequential = sum(unit_s)
        for n, split in stages.items():
            for s in STRIDES:
                step = costmodel.asyncdiff_round(split, link, s) / s
                out.append({"model": arch.name, "shape": arch.shape, "source": source, "stages": n, "stride": s,
                            "devices": n + s - 1, "sequential_step_s": round(sequential, 4),
                            "step_s": round(step, 4), "speedup_per_step": round(sequential / step, 2),
                            "max_weights_gib": round(max(split.weight_bytes) / 2**30, 2),
                            "mib_crossing_per_step": round(sum(split.crossing.values()) / 2**20, 1)})
        log(f"projected {arch.name}: {sum(p.flops for p in profiles) / 1e12:.1f} TFLOP per step, {source}")
    return out


def measured_link(config: BenchConfig, device: torch.device, log) -> tuple[costmodel.Link, dict]:
    """The link the projections use: measured between two local ranks, or the one given in the config."""
    if config.link_gbps is not None and config.link_latency_us is not None:
        given = costmodel.Link(config.link_latency_us * 1e-6, config.link_gbps * 1e9)
        info = {"measured_on": "not measured (given)", "sizes": [], "one_way_s": [],
                "latency_us": config.link_latency_us, "gb_per_s": config.link_gbps,
                "used": {"latency_us": config.link_latency_us, "gb_per_s": config.link_gbps}}
        return given, info
    link_device = device if device.type == "cpu" or torch.cuda.device_count() >= 2 else torch.device("cpu")
    sizes, seconds = bench_runs.link(link_device)
    fitted = costmodel.fit_link(sizes, seconds)
    info = {"measured_on": link_device.type, "sizes": sizes, "one_way_s": [round(s, 7) for s in seconds],
            "latency_us": round(fitted.latency_s * 1e6, 1), "gb_per_s": round(fitted.bandwidth / 1e9, 3)}
    used = costmodel.Link((config.link_latency_us * 1e-6) if config.link_latency_us is not None else fitted.latency_s,
                          (config.link_gbps * 1e9) if config.link_gbps is not None else fitted.bandwidth)
    info["used"] = {"latency_us": round(used.latency_s * 1e6, 1), "gb_per_s": round(used.bandwidth / 1e9, 3)}
    log(f"link: {info['latency_us']} us + bytes / {info['gb_per_s']} GB/s")
    return used, info


def run_bench(config: BenchConfig, log=print) -> dict:
    """Run the whole benchmark and write its JSON, markdown and plots under `config.out`; returns the JSON."""
    if config.plots:
        check_plotting()
    quiet_libraries()
    if config.adherence_only:
        return _refresh_adherence(config, log)
    if config.repredict:
        return repredict(config, log)
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible; use --device cpu")
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        log(f"warning: load average {load_before:.1f} before starting; other work on this machine skews timings")
    started = time.perf_counter()
    link, link_info = measured_link(config, device, log)
    models = {m: bench_model(m, config, device, link, log) for m in config.models}
    rates = {}
    for name, result in models.items():
        family = "svd" if result["request"]["task"] == "image-to-video" else "animatediff"
        costs = result["cost_inputs"]
        rates[family] = costs["flops_per_step"] / costs["unit_s_sum"]
    rates.setdefault("svd", next(iter(rates.values())))
    rates.setdefault("animatediff", rates["svd"])
    full_size = project_full_size(device, link, rates, log) if config.full_size else []
    adherence = None
    if config.adherence:
        adherence = adherence_section(config, log, config.adherence_model)
    result = {"meta": meta(config, load_before, time.perf_counter() - started), "link": link_info,
              "models": models, "full_size": full_size, "adherence": adherence}
    write_report(result, config)
    return result


def _refresh_adherence(config: BenchConfig, log) -> dict:
    """Replace the adherence section of `out/benchmarks.json` and rewrite the report around the other sections."""
    path = Path(config.out) / "benchmarks.json"
    if not path.is_file():
        raise UsageError(f"no {path} to add adherence to; run `asyncvid bench` first (or pass --adherence to it)")
    result = json.loads(path.read_text())
    result["adherence"] = adherence_section(config, log, config.adherence_model)  # it carries its own command
    write_report(result, config)
    return result


def meta(config: BenchConfig, load_before: float, seconds: float) -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "command": config.command, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {launch.threads_per_process(1)} cores, {_cpu_name()}, Python "
                   f"{platform.python_version()}, {platform.system()} {platform.release()}",
        "gpu": gpu, "device": config.device, "torch": torch.__version__, "diffusers": version("diffusers"),
        "asyncvid": version("asyncvid"), "load_average_before": round(load_before, 2),
        "load_average_after": round(os.getloadavg()[0], 2), "seconds": round(seconds, 1),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
    }


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"
