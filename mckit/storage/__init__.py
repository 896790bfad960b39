"""Layer 0, storage: atomic writes, safetensors files read and written through numpy, the repository's paths."""
