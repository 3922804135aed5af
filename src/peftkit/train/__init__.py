"""The method-agnostic training loop, checkpoints, run orchestration."""
