"""Judging videos: fidelity against a reference (PSNR, SSIM) and adherence to a prompt (colour, shape, direction)."""
