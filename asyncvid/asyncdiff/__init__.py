"""AsyncDiff (Chen et al., NeurIPS 2024): the UNet as named units, split into stages, run by a hook on each rank.

Vocabulary: a *unit* is one module of the UNet's forward (a resnet, an attention block, a sampler); a *stage* is a
run of units on one rank; a *step* is one denoising step; a *round* is one parallel iteration, in which every stage
computes at once on what the previous stage produced one round earlier.
"""
