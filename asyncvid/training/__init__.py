"""Training the embedded tiny models on procedural clips (asyncvid.clips): VAEs, then UNets on cached latents."""
