"""Tiny seeded Llama checkpoints on disk for the merge engine and CLI tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def tiny_base(seed: int = 0, vocab_size: int = 64) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(vocab_size))
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def fine_tuned(base: dict[str, torch.Tensor], seed: int, scale: float = 0.02) -> dict[str, torch.Tensor]:
    """A 'fine-tuned' copy: the base plus a seeded Gaussian perturbation of every tensor."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()}


def save_checkpoint(state: dict[str, torch.Tensor], path: Path, sharded: bool = False,
                    vocab_size: int = 64) -> Path:
    """Write ``state`` as a transformers checkpoint: one file, or 20 KB shards with an index."""
    path.mkdir(parents=True)
    if sharded:
        model = LlamaForCausalLM(tiny_config(vocab_size))
        model.load_state_dict(state)
        model.save_pretrained(path, max_shard_size="20KB")
        assert (path / "model.safetensors.index.json").is_file()
    else:
        tiny_config(vocab_size).save_pretrained(path)
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def load_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    state = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def tree_snapshot(path: Path) -> dict[str, bytes]:
    """Contents of every file under ``path`` (to show inputs are never modified)."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(autouse=False)
def one_thread():
    """Run torch single-threaded: many tiny matrix ops are far slower with 2 threads on a busy machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
