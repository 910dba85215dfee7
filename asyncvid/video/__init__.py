"""Frames in and out: the Video object, its writers, output names, sidecars and resuming a batch."""
