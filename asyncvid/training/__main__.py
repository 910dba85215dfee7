"""`python -m asyncvid.training`: train the embedded models (asyncvid.training.cli)."""

from asyncvid.training.cli import main

main()
