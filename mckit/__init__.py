"""mckit: model composition of multimodal LLMs, taught and reproduced on a toy world."""

__version__ = "0.1.0"
