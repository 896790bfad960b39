"""Layer 2, models: encoders, projectors, the MLLM and its one forward path, per-token routing, LoRA,
training, checkpoints, adapters for real checkpoints, the shipped models."""
