"""Training: checkpoints, logs, and one trainer per model family."""
