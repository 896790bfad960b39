"""mckit: model composition of multimodal LLMs, taught and reproduced on a toy world."""

import os

# OpenMP threads that wait for work sleep instead of spinning. With torch's threads spinning, a CPU
# shared with one other busy process ran a notebook six times slower (02: 83 s against 13 s idle);
# sleeping threads cost 5-15% when the CPU is idle and keep a shared CPU at about 2x. The OpenMP
# runtime reads this once, when torch is first imported, so it only applies where mckit is imported
# before torch (every notebook); an explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
