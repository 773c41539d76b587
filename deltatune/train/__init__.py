"""Training: config, data, the loop, checkpoints."""
