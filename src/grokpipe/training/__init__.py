"""Training one run: the demo's data and model, the lean (folded) forward, the loop, resume state."""
