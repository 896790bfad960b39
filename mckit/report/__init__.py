"""Layer 8, report: plots, the notebooks' helpers, launch links, ``make reproduce``."""
