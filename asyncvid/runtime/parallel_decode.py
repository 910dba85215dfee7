"""Decoding on every rank: each decodes whole chunks of frames with the pipeline's own VAE code; rank 0 gathers."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist


def frame_count(latents: torch.Tensor, adapter) -> int:
    return latents.shape[adapter.FRAME_DIM]


def parallel_decode(pipe, adapter, latents: torch.Tensor, request, group=None) -> np.ndarray | None:
    """Float frames (F, H, W, 3) on rank 0, None on the others; equal to decoding everything on one rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    frames = frame_count(latents, adapter)
    size = adapter.decode_chunk(pipe, request, frames)
    chunks = [(a, min(a + size, frames)) for a in range(0, frames, size)]
    # Contiguous runs of whole chunks per rank. Threads stay as they are even where ranks idle: on the CPU the
    # thread count changes float rounding, and decoding must match a sequential run with the same threads.
    mine = [c for i, c in enumerate(chunks) if i * world // len(chunks) == rank]
    with torch.inference_mode():
        decoded = [(a, adapter.decode(pipe, latents, request, a, b)) for a, b in mine]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(decoded, gathered, group=group, group_dst=0)
    if rank != 0:
        return None
    parts = sorted((a, f) for part in gathered for a, f in part)
    return np.concatenate([f for _, f in parts], axis=0)

