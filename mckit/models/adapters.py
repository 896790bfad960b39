"""Adapters: what the kit needs to know about an LLM family beyond the ``transformers`` causal-LM interface.

An :class:`LLMAdapter` gives the position ids of a batch (1-D for Llama and
Vicuna; Qwen2-VL's M-RoPE wants (3, B, L): temporal, height and width indices
that stay constant along a text run and follow the grid over an image) and the
positions of generated tokens. :func:`adapter_for` picks one from the model's
config; real checkpoint classes plug in here.
"""

from __future__ import annotations

import torch
from torch import nn

from mckit.models.batch import default_positions


class LLMAdapter:
    """Llama-style 1-D positions: 0, 1, 2 ... from each row's first real token."""

    #: Dimensions of ``position_ids`` before (B, L).
    position_axes: int = 0

    def position_ids(self, attention_mask: torch.Tensor, spans: list[list[tuple[str, int, int]]]) -> torch.Tensor:
        """(B, L) positions of a left-padded batch; ``spans``: per row, (modality, start, length) of each input."""
        return default_positions(attention_mask, spans)

    def next_positions(self, prompt_positions: torch.Tensor, attention_mask: torch.Tensor, step: int) -> torch.Tensor:
        """Positions (B, 1) of the ``step``-th generated token (1-based): one past the prompt's last, plus step - 1."""
        return prompt_positions[..., -1:] + step


class MRoPEAdapter(LLMAdapter):
    """Qwen2-VL-style 3-D positions (M-RoPE): (3, B, L) temporal / height / width indices.

    Text positions advance by one on all three axes. An input whose ``n_tokens``
    form the grid ``grids[m] = (t, h, w)`` takes ``start + (ti, hi, wi)`` over its
    tokens (row-major), and the text after it resumes at one past the largest index
    used. A modality without a grid is laid out as (1, 1, n_tokens).
    """

    position_axes = 1

    def __init__(self, grids: dict[str, tuple[int, int, int]] | None = None):
        self.grids = grids or {}

    def _grid(self, modality: str, length: int) -> torch.Tensor:
        t, h, w = self.grids.get(modality, (1, 1, length))
        if t * h * w != length:
            raise ValueError(f"grid {t}x{h}x{w} of {modality} does not hold its {length} positions")
        ti, hi, wi = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        return torch.stack([ti.reshape(-1), hi.reshape(-1), wi.reshape(-1)])        # (3, length)

    def position_ids(self, attention_mask: torch.Tensor, spans: list[list[tuple[str, int, int]]]) -> torch.Tensor:
        batch, width = attention_mask.shape
        out = torch.zeros((3, batch, width), dtype=torch.long)
        for row in range(batch):
            runs = {start: (mod, length) for mod, start, length in spans[row]}
            col, nxt = int((attention_mask[row] == 0).sum()), 0
            while col < width:
                if col in runs:
                    mod, length = runs[col]
                    grid = self._grid(mod, length) + nxt
                    out[:, row, col:col + length] = grid
                    nxt, col = int(grid.max()) + 1, col + length
                else:
                    out[:, row, col] = nxt
                    nxt, col = nxt + 1, col + 1
        return out

    def next_positions(self, prompt_positions: torch.Tensor, attention_mask: torch.Tensor, step: int) -> torch.Tensor:
        """(3, B, 1): one past the largest index of the prompt, plus step - 1, on every axis."""
        return prompt_positions.amax(dim=(0, 2), keepdim=True).expand(3, -1, 1) + step


def adapter_for(llm: nn.Module) -> LLMAdapter:
    """The adapter of ``llm``'s family: M-RoPE when its config asks for it (``rope_scaling.mrope_section``)."""
    config = getattr(llm, "config", None)
    rope = (getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {})
    if isinstance(rope, dict) and "mrope_section" in rope:
        return MRoPEAdapter()
    return LLMAdapter()
