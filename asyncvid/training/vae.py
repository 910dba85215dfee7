"""The tiny VAEs: AnimateDiff's AutoencoderKL on single frames, SVD's temporal decoder on whole clips."""

from __future__ import annotations

import torch

from asyncvid.training.data import clip_set, object_weight, pick

KL_WEIGHT = 1e-6
CROP = 32  # the VAEs are convolutional: 32x32 windows on the shape train 4x faster than whole frames


def vae_loss_fn(vae, *, temporal: bool, clips_per_caption: int = 16, num_frames: int = 8, seed: int = 0):
    """A loss over a fixed pool of clips: object-weighted MSE + L1 of reconstructions, plus a small KL term.

    `temporal` (SVD's decoder) reconstructs whole clips so its temporal layers see motion; batch counts clips.
    Otherwise the batch counts single frames.
    """
    _, pool = clip_set(clips_per_caption, num_frames, seed)
    centres = _centres(pool)

    def loss(model, batch, generator):
        if temporal:
            idx = pick(len(pool), batch, generator)
            x = _crop(pool[idx], centres[idx, num_frames // 2], generator).flatten(0, 1)
        else:
            idx = pick(len(pool) * num_frames, batch, generator)
            x = _crop(pool.flatten(0, 1)[idx], centres.flatten(0, 1)[idx], generator)
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=None)
        recon = model.decode(z, num_frames=num_frames).sample if temporal else model.decode(z).sample
        w = object_weight(x)
        err = recon - x
        return (w * err.square()).mean() + (w * err.abs()).mean() + KL_WEIGHT * posterior.kl().mean()

    return loss


def _centres(pool: torch.Tensor) -> torch.Tensor:
    """(clips, frames, 2) centroid (y, x) of the shape in every frame, from the object mask."""
    mask = object_weight(pool) > 1  # (clips, frames, 1, H, W)
    grid = torch.arange(pool.shape[-1], dtype=torch.float32)
    area = mask.sum((-1, -2, -3)).clamp(min=1)
    return torch.stack([(mask * grid[:, None]).sum((-1, -2, -3)) / area, (mask * grid).sum((-1, -2, -3)) / area], -1)


def _crop(x: torch.Tensor, centres: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A CROP x CROP window per item of x (..., 3, H, W) around its centre, jittered by up to 8 pixels."""
    size = x.shape[-1]
    jitter = torch.randint(-8, 9, (len(x), 2), generator=generator)
    corner = (centres.round().long() - CROP // 2 + jitter).clamp(0, size - CROP)
    return torch.stack([x[i, ..., y:y + CROP, c:c + CROP] for i, (y, c) in enumerate(corner.tolist())])


@torch.no_grad()
def set_scaling_factor(vae, *, num_frames: int = 8, seed: int = 1) -> float:
    """Scale latents to unit standard deviation, as SD's 0.18215 does for its VAE; stored in the VAE's config."""
    _, pool = clip_set(2, num_frames, seed)
    latents = torch.cat([vae.encode(c).latent_dist.mean for c in pool])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(factor, 5))
    return factor
