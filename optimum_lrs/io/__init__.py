"""What leaves the process: checkpoints and model cards."""
