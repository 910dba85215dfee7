"""The embedded models' training recipes: step budgets and the options each shipped run trained with."""

# The AnimateDiff recipe (r8): its step budget and how many of those steps end it with a decaying learning rate.
ANIMATEDIFF_STEPS, ANNEAL = 3443, 700
# The VAE recipe (r5), phase after phase, each resuming the last one's checkpoint: 32x32 windows around the shape
# teach shapes fast; whole frames follow, because the VAE's group norms and attention see a window differently
# from a frame (trained on windows only, it bowed the sides of squares in whole frames: docs/MODELS.md, round 6).
# Every phase aligns the latents with the shape (0.3: from scratch, a perfect round trip; round 19); the last two
# decode through latent noise, so a UNet's small errors do not round the corners (rounds 18-20). Added from the
# start, the noise kept the decoder from learning corners at all (round 19).
VAE_RECIPE = (dict(steps=5000, anneal=1000, lr=1e-3, crop=32, batch=16, shape_align=0.3, latent_noise=0.0),
              dict(steps=6000, anneal=500, lr=3e-4, crop=64, batch=4, shape_align=0.3, latent_noise=0.0),
              dict(steps=8000, anneal=1000, lr=5e-4, crop=32, batch=16, shape_align=0.3, latent_noise=0.2),
              dict(steps=8500, anneal=300, lr=3e-4, crop=64, batch=4, shape_align=0.3, latent_noise=0.2))
# AnimateDiff's first stage (`--image-steps`): the UNet and text encoder as an image model, on single frames of the
# clips, 64 a step; the clips' stage starts from it. On 4 clips a step from scratch the shape word was never learnt
# (chance); as an image model it was, after about 2,400 steps (docs/MODELS.md, rounds 8-9). Off by default (r8's
# recipe); r9 trained 2,400, with --motion-gain 3 and --colour-pairs 4 (docs/MODELS.md, "The shipped runs").
IMAGE_STEPS, IMAGE_BATCH, IMAGE_LR = 0, 64, 8e-4
# The motion modules' rate in the clips' stage, as a multiple of --lr: after an image stage they are the layers that
# have learnt nothing yet (at 3, with the smaller shapes too, direction rose from 76% to 88%: docs/MODELS.md,
# round 10; 1 in r8's recipe, 3 in r9's).
MOTION_GAIN = 1.0
# Image stage: the weight of shape pairs' prediction differences (`--shape-pairs`; 0: plain frames only, as in r8 and
# rounds 9-13, where squares came out as circles), and how many geometries are rendered for them (each as 3 shapes).
SHAPE_PAIRS, SHAPE_PAIR_GEOMETRIES = 0.0, 4096
# Image stage: the same for colour pairs (`--colour-pairs`; each colour with its nearest two), 8 colours per
# geometry. Off by default (round 23 tried it against the r5 VAE's warm hues; r9 trained with 4).
COLOUR_PAIRS, COLOUR_PAIR_GEOMETRIES = 0.0, 1024
SVD_STEPS = 4500  # the SVD UNet's (r5), the last fifth annealed (r4: 3,000, whose colour stopped at 94%: round 21)
