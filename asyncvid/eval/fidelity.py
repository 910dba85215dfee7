"""How close a parallel sampler's frames are to sequential sampling's: PSNR and SSIM of uint8 frames, per frame."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# SSIM as Wang et al. (2004) define it: 11x11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03, on 8-bit values.
WINDOW, SIGMA, K1, K2, PEAK = 11, 1.5, 0.01, 0.03, 255.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 frames, in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(PEAK**2 / mse))


def _window(size: int) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * SIGMA**2))
    return g / g.sum()


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel SSIM of two (H, W) or (H, W, C) images in [0, 255], over the valid region of the window (the
    window shrinks to the image for images smaller than 11 pixels)."""
    x, y = (torch.as_tensor(np.asarray(v, dtype=np.float64)) for v in (a, b))
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = (v[..., None] if v.dim() == 2 else v for v in (x, y))
    x, y = (v.permute(2, 0, 1)[:, None] for v in (x, y))  # (C, 1, H, W)
    size = min(WINDOW, x.shape[-1], x.shape[-2])
    g = _window(size)
    kernel = (g[:, None] * g[None, :])[None, None]

    def blur(v):
        return F.conv2d(v, kernel)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * PEAK) ** 2, (K2 * PEAK) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s[:, 0].permute(1, 2, 0).numpy()


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean SSIM of two images (channels averaged), in [-1, 1]; 1 when identical."""
    return float(ssim_map(a, b).mean())


def compare(frames: np.ndarray, reference: np.ndarray) -> dict:
    """PSNR and SSIM of each frame against the reference's, averaged over frames (PSNR: inf only if all are)."""
    if frames.shape != reference.shape:
        raise ValueError(f"frames {frames.shape} and reference {reference.shape} differ in shape; compare runs of "
                         f"the same request")
    psnrs = [psnr(f, r) for f, r in zip(frames, reference)]
    finite = [p for p in psnrs if np.isfinite(p)]
    return {
        "psnr_db": float(np.mean(finite)) if finite else float("inf"),
        "ssim": float(np.mean([ssim(f, r) for f, r in zip(frames, reference)])),
    }
