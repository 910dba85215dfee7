"""ParaTAA (Tang et al., ICML 2024): the sampling trajectory as a triangular system, solved by fixed-point rounds
with triangular Anderson acceleration; a round evaluates a window of steps in one batch split across ranks."""
