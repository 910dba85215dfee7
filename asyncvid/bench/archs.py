"""The full-size architectures the benchmark projects to: SVD-xt and SD1.5 + AnimateDiff v1.5.2 UNets, from their
published configs, profiled on fake tensors (shapes, FLOPs, weight bytes) and timed on CUDA with random weights."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import UNetMotionModel, UNetSpatioTemporalConditionModel

from asyncvid.asyncdiff.costs import fake_trace, measure_times
from asyncvid.asyncdiff.timing import scale_times
from asyncvid.bench.checkpoints import SVD_XT_UNET
from asyncvid.bench.costmodel import Stages, split
from asyncvid.pipelines import unet_inputs

SVD_XT = {k: v for k, v in SVD_XT_UNET.items() if not k.startswith("_")}  # as published (bench.checkpoints)
ANIMATEDIFF_SD15 = {  # the SD1.5 UNet merged with motion adapter v1-5-2, as UNetMotionModel.from_unet2d builds it
    "act_fn": "silu", "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlockMotion"] * 3 + ["DownBlockMotion"], "downsample_padding": 1,
    "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "motion_max_seq_length": 32,
    "motion_num_attention_heads": 8, "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": 8,
    "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlockMotion"] + ["CrossAttnUpBlockMotion"] * 3, "use_linear_projection": False,
    "use_motion_mid_block": True,
}


@dataclass(frozen=True)
class Arch:
    """A full-size UNet: its config, the shape it samples at, and the small shape it is timed at on a GPU."""

    name: str
    family: str  # "svd" or "animatediff": the tiny model of the same family
    config: dict
    shape: dict  # frames, height, width
    small: dict

    def build(self):
        cls = UNetSpatioTemporalConditionModel if self.family == "svd" else UNetMotionModel
        return cls.from_config(self.config)

    @property
    def units(self):
        return unet_inputs.SVD if self.family == "svd" else unet_inputs.MOTION


ARCHS = (
    Arch("SVD-xt", "svd", SVD_XT, dict(frames=25, height=576, width=1024), dict(frames=8, height=256, width=256)),
    Arch("AnimateDiff (SD1.5)", "animatediff", ANIMATEDIFF_SD15, dict(frames=16, height=512, width=512),
         dict(frames=8, height=256, width=256)),
)


def fake_costs(arch: Arch, shape: dict, stage_counts, unit_s=None):
    """(profiles, {stages: Stages}) of `arch` at `shape` on fake tensors; stages balanced on `unit_s` (default
    FLOPs). Weights and activations are shapes only, so a 1.5B-parameter UNet costs no memory."""
    with torch.device("meta"):
        unet = arch.build()
    traced = fake_trace(unet, arch.units, shape)
    profiles = traced.profiles
    times = unit_s or [float(p.flops) for p in profiles]
    stages = {n: split(profiles, times, traced.program, n, profiles[-1].out_bytes) for n in stage_counts}
    return profiles, stages


def cuda_unit_times(arch: Arch, device: torch.device, dtype=torch.float16) -> list[float]:
    """Seconds per unit at `arch.small` with random weights on `device`, scaled to `arch.shape` unit by unit by the
    ratio of FLOPs (of output bytes for units without matmuls)."""
    small, _ = fake_costs(arch, arch.small, ())
    full, _ = fake_costs(arch, arch.shape, ())
    torch.manual_seed(0)
    unet = arch.build().to(device=device, dtype=dtype).eval()
    args, kwargs = arch.units.example_inputs(unet, **arch.small)
    args = tuple(a.to(device=device, dtype=dtype if a.is_floating_point() else a.dtype) for a in args)
    times = measure_times(unet, arch.units.build_program(unet), args, kwargs)
    del unet
    return scale_times(times, small, full)


def project(arch: Arch, stage_counts, *, unit_s=None, rate: float | None = None, element_bytes: int = 4):
    """Per-unit seconds (measured `unit_s`, or FLOPs / `rate`) and the stage splits they give, with weights and
    crossing tensors counted at `element_bytes` per value (profiles count float32)."""
    profiles, _ = fake_costs(arch, arch.shape, ())
    if unit_s is None:
        unit_s = [p.flops / rate for p in profiles]
    _, stages = fake_costs(arch, arch.shape, stage_counts, unit_s)
    scale = element_bytes / 4
    scaled = {n: Stages(s.compute_s, tuple(int(w * scale) for w in s.weight_bytes),
                        {k: int(b * scale) for k, b in s.crossing.items()}, int(s.eps_bytes * scale))
              for n, s in stages.items()}
    return profiles, unit_s, scaled
