"""asyncvid: video diffusion (Stable Video Diffusion, AnimateDiff) sampled in parallel across devices."""

__version__ = "0.1.0"
