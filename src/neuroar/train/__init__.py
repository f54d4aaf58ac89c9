"""Training: the shared loop and logs, and one trainer per model family."""
