"""Where models come from and how they are set up: sources, weights on disk, devices, schedulers, sampling defaults."""
