"""`python -m asyncvid.training`: train the embedded models (asyncvid.training.cli)."""

import os

# Before transformers is first imported (diffusers imports it): it reads this once, and without torchvision it
# warns at import time about image processors the training never uses. The asyncvid CLI does the same.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from asyncvid.training.cli import main  # noqa: E402

main()
