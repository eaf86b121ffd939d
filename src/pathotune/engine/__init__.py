"""Training and evaluation engine: loops, checkpoints and metrics."""
