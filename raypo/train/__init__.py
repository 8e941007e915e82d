"""Distributed training: the Ray Train loop, DeepSpeed config, schedule, metrics and checkpoints."""
