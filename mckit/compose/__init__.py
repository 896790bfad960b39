"""Layer 4, composition: one MLLM from several (static merges, NaiveMC, controls, routed deltas)."""
