"""Training the embedded tiny models on procedural clips (asyncvid.eval.clips): VAEs, then UNets on cached latents."""
