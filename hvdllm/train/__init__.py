"""Training: the loop, checkpoints, metrics and reports."""
