"""Layer 3, merging: the method registry, the methods as pure tensor functions, task vectors,
interference between them, and the streaming engine over safetensors checkpoints."""
