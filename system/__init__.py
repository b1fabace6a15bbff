"""Model, data, schedules, trainer, checkpoints and metrics (single-device unless stated)."""
