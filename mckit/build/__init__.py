"""Layer 7, builds: train the toy world's models and the capability experts shipped under ``data/``."""
