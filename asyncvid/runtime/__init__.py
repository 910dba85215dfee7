"""Running samplers: processes and process groups, loading a sampler on each rank, one video, a batch, workers."""
