"""`asyncvid bench`: the samplers side by side on one model and seed, with a cost model that projects them."""
