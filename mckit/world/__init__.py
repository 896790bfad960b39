"""Layer 1, the toy world: entities, renderers, tasks and prompts, the tokenizer, capability items."""
