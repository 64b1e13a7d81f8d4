"""Training: options and flags, data, the loop, losses, evaluation, the run folder."""
