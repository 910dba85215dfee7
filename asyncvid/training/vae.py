"""The tiny VAEs: AnimateDiff's AutoencoderKL on single frames, SVD's temporal decoder on whole clips."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from asyncvid.eval.adherence import score_video, summarize
from asyncvid.eval.clips import COLOURS, SHAPES, heldout_captions
from asyncvid.training.data import clip_set, clip_tensor, object_weight, pick

KL_WEIGHT = 1e-6
# `--shape-align`: the shape read from the latent by a fixed linear map (one unit direction per shape, logits this
# many times the projection of unit-variance latents), so a shape's code is a step of about one standard deviation.
SHAPE_LOGIT_SCALE = 3.0
# `--colour-align`: the colour read the same way, along 8 unit directions evenly spaced on a circle, in colour-wheel
# order, in the plane the shape readout leaves free (its rows' sum, on which every shape's logit moves alike, and
# the one latent direction it does not read). Each hue then lies outward from the centre in its own direction:
# in the r5 VAE red, orange and yellow lie on one outward line (round 23), so a prediction pushed outward, as
# guidance pushes it, turns red orange and orange yellow; on the circle it would saturate the hue instead.
COLOUR_WHEEL = tuple(COLOURS)  # listed in wheel order, red to pink
CROP = 32  # the VAEs are convolutional: 32x32 windows on the shape train 4x faster than whole frames
# The embedded models' AutoencoderKL (r4). The test builders' VAE (32 channels at every level, one layer per block)
# rounds every corner: its round trip reads 34% of held-out shapes right, this one 98% (docs/MODELS.md, round 6).
VAE_CONFIG = dict(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=8, layers_per_block=2,
                  sample_size=64)


def build_vae(seed: int) -> AutoencoderKL:
    """The shipped VAE's architecture with seeded random weights (64x64 frames -> 8x8x4 latents)."""
    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def vae_loss_fn(vae, *, temporal: bool, clips_per_caption: int = 16, num_frames: int = 8, seed: int = 0,
                edge_weight: float = 0.0, crop: int = CROP, kl_weight: float = KL_WEIGHT, shape_align: float = 0.0,
                latent_noise: float = 0.0, colour_align: float = 0.0):
    """A loss over a fixed pool of clips: object-weighted MSE + L1 of reconstructions, plus a small KL term, plus
    (with `edge_weight`) an L1 of the differences between neighbouring pixels, which blur costs where MSE barely sees
    it: at a square's rounded corner.

    `temporal` (SVD's decoder) reconstructs whole clips so its temporal layers see motion; batch counts clips.
    Otherwise the batch counts single frames.

    `shape_align` weighs a cross-entropy that makes the latent pixels on the shape tell its shape along fixed
    directions, by as large a step as colour takes (latents aligned with semantic labels are easier for a diffusion
    model to learn, as in VA-VAE, Yao et al., 2025: a square and its circle otherwise differ by 0.05 of a standard
    deviation, docs/MODELS.md round 15); `latent_noise` decodes from latents with that much Gaussian noise (in
    standard deviations), so the decoder draws the corners from that robust code, not only from fine detail a
    UNet blurs. `colour_align` does for colour what `shape_align` does for shape, on the colour wheel
    (`colour_readout`).
    """
    captions, pool = clip_set(clips_per_caption, num_frames, seed)
    centres = _centres(pool)
    labels = torch.tensor([SHAPES.index(c.shape) for c in captions]).repeat_interleave(num_frames)  # per frame
    colours = torch.tensor([COLOUR_WHEEL.index(c.colour) for c in captions]).repeat_interleave(num_frames)
    readout, wheel = shape_readout(), colour_readout()

    def loss(model, batch, generator):
        if temporal:
            idx = pick(len(pool), batch, generator)
            x = _crop(pool[idx], centres[idx, num_frames // 2], generator, crop).flatten(0, 1)
        else:
            idx = pick(len(pool) * num_frames, batch, generator)
            x = _crop(pool.flatten(0, 1)[idx], centres.flatten(0, 1)[idx], generator, crop)
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=None)
        if latent_noise or shape_align or colour_align:  # each counts in the latents' spread
            scale = posterior.mean.std().detach().clamp(min=1e-6)
        if latent_noise:
            z = z + latent_noise * scale * torch.randn(z.shape, generator=generator)
        recon = model.decode(z, num_frames=num_frames).sample if temporal else model.decode(z).sample
        w = object_weight(x)
        err = recon - x
        total = (w * err.square()).mean() + (w * err.abs()).mean() + kl_weight * posterior.kl().mean()
        if edge_weight:
            total = total + edge_weight * sum((d(recon) - d(x)).abs().mean() for d in _DIFFS)
        if not temporal and (shape_align or colour_align):
            latents, on_shape = posterior.mean / scale, (w > 1).float()
            for weight, named, directions in ((shape_align, labels, readout), (colour_align, colours, wheel)):
                if weight:  # the shape's latent pixels read for its shape, then for its colour
                    total = total + weight * _label_error(latents, on_shape, named[idx], directions)
        return total

    return loss


def shape_readout() -> torch.Tensor:
    """`--shape-align`'s fixed directions, one per shape: (shapes, latent channels), orthonormal rows, seeded."""
    directions = torch.randn(VAE_CONFIG["latent_channels"], len(SHAPES), generator=torch.Generator().manual_seed(0))
    return torch.linalg.qr(directions)[0].T


def colour_readout() -> torch.Tensor:
    """`--colour-align`'s fixed directions, one per colour of COLOUR_WHEEL: (colours, latent channels), unit rows
    at equal angles on a circle orthogonal to what `shape_readout` tells apart."""
    shapes = shape_readout()
    across = shapes.sum(0) / shapes.sum(0).norm()  # moves every shape's logit alike
    rest = torch.linalg.svd(shapes.T @ shapes - torch.eye(shapes.shape[1]))[0][:, 0]  # the direction no row reads
    angles = torch.arange(len(COLOUR_WHEEL)) * (2 * torch.pi / len(COLOUR_WHEEL))
    return torch.cos(angles)[:, None] * across + torch.sin(angles)[:, None] * rest


def _label_error(latents, mask, labels, readout) -> torch.Tensor:
    """Cross-entropy of the label (shape or colour) read by `readout` from each latent pixel mostly covered by the
    shape."""
    size = mask.shape[-1] // latents.shape[-1]
    on_shape = torch.nn.functional.avg_pool2d(mask, size)[:, 0] > 0.25  # (B, h, w)
    if not on_shape.any():
        return latents.new_zeros(())
    logits = SHAPE_LOGIT_SCALE * torch.einsum("kc,bchw->bkhw", readout, latents)
    targets = labels[:, None, None].expand_as(on_shape)
    return torch.nn.functional.cross_entropy(logits.permute(0, 2, 3, 1)[on_shape], targets[on_shape])


_DIFFS = (lambda x: x[..., 1:, :] - x[..., :-1, :], lambda x: x[..., :, 1:] - x[..., :, :-1])  # down, across


def _centres(pool: torch.Tensor) -> torch.Tensor:
    """(clips, frames, 2) centroid (y, x) of the shape in every frame, from the object mask."""
    mask = object_weight(pool) > 1  # (clips, frames, 1, H, W)
    grid = torch.arange(pool.shape[-1], dtype=torch.float32)
    area = mask.sum((-1, -2, -3)).clamp(min=1)
    return torch.stack([(mask * grid[:, None]).sum((-1, -2, -3)) / area, (mask * grid).sum((-1, -2, -3)) / area], -1)


def _crop(x: torch.Tensor, centres: torch.Tensor, generator: torch.Generator, crop: int) -> torch.Tensor:
    """A crop x crop window per item of x (..., 3, H, W) around its centre, jittered by up to 8 pixels; whole
    frames when crop covers them."""
    size = x.shape[-1]
    jitter = torch.randint(-8, 9, (len(x), 2), generator=generator)
    if crop >= size:
        return x
    corner = (centres.round().long() - crop // 2 + jitter).clamp(0, size - crop)
    return torch.stack([x[i, ..., y:y + crop, c:c + crop] for i, (y, c) in enumerate(corner.tolist())])


@torch.no_grad()
def set_scaling_factor(vae, *, num_frames: int = 8, seed: int = 1) -> float:
    """Scale latents to unit standard deviation, as SD's 0.18215 does for its VAE; stored in the VAE's config."""
    _, pool = clip_set(2, num_frames, seed)
    latents = torch.cat([vae.encode(c).latent_dist.mean for c in pool])
    factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=round(factor, 5))
    return factor


@torch.no_grad()
def round_trip_scores(vae, *, num_frames: int = 16, seed: int = 0) -> dict:
    """Adherence of held-out clips encoded and decoded (latent means): the ceiling a UNet on these latents can reach."""
    return _decoded_mean_scores(vae, [seed], num_frames)


def mean_latent_scores(vae, *, clips: int = 8, num_frames: int = 16) -> dict:
    """Adherence of each held-out caption's mean latent clip (over `clips` seeds), decoded: at zero terminal SNR the
    first sampling step predicts exactly that mean, so a latent space whose averages decode to another colour (red
    to pink) starts every video on the wrong colour. Colour is what this scores; a mean's shape is a blur."""
    return _decoded_mean_scores(vae, range(clips), num_frames)


@torch.no_grad()
def _decoded_mean_scores(vae, seeds, num_frames: int) -> dict:
    """Each held-out caption's clips at `seeds`, encoded (latent means), averaged, decoded and scored."""
    scores = []
    for caption in heldout_captions():
        latents = torch.stack([vae.encode(clip_tensor(caption, seed, num_frames)).latent_dist.mean for seed in seeds])
        frames = vae.decode(latents.mean(0)).sample
        scores.append(score_video(((frames + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy(), caption.text))
    return summarize(scores)
