"""Adapters: what the kit needs to know about an LLM family beyond the ``transformers`` causal-LM interface.

An :class:`LLMAdapter` gives the position ids of a batch (1-D for Llama and
Vicuna; Qwen2-VL's M-RoPE wants (3, B, L): temporal, height and width indices
that follow the grid over an image or a video, as a :class:`Layout` says) and the
positions of generated tokens. :func:`adapter_for` picks one from the model's
config; real checkpoint classes plug in here.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Layout:
    """How one input's merged tokens sit on M-RoPE's three axes.

    ``grid`` (t, h, w): the tokens in row-major order over t temporal patches of h x w. Token (ti, hi, wi) of an
    input starting at index ``s`` takes (s + floor(ti * step), s + hi, s + wi). ``step``: the temporal index's
    stride per temporal patch (1 for an image; Qwen2.5-VL's video: tokens_per_second x seconds per temporal
    patch). ``resume``: where the text after the input resumes: ``"max"`` at one past the largest index used
    (the Omni thinker), ``"side"`` at s + max(h, w) (Qwen2-VL and Qwen2.5-VL; the same for an image, smaller
    for a video whose temporal index outruns its side).
    """

    grid: tuple[int, int, int]
    step: float = 1.0
    resume: str = "max"


class MRoPEAdapter(LLMAdapter):
    """Qwen2-VL-style 3-D positions (M-RoPE): (3, B, L) temporal / height / width indices.

    Text positions advance by one on all three axes. An input of a modality with a layout
    (``grids[m]``: a :class:`Layout` or its (t, h, w) grid) follows that layout; a modality
    without one (audio) advances like text: s + i on all three axes over its ``n_tokens``,
    as the Omni thinker lays out audio and as a 1-D source sees its inputs.
    """

    position_axes = 1

    def __init__(self, grids: dict[str, tuple[int, int, int] | Layout] | None = None):
        self.layouts = {m: g if isinstance(g, Layout) else Layout(tuple(g)) for m, g in (grids or {}).items()}
        self.grids = {m: tuple(lay.grid) for m, lay in self.layouts.items()}

    def _run(self, modality: str, length: int, start: int) -> tuple[torch.Tensor, int]:
        """(3, length) indices of one input starting at ``start``, and where the text after it resumes."""
        if modality not in self.layouts:
            return torch.arange(length).expand(3, -1) + start, start + length
        lay = self.layouts[modality]
        t, h, w = lay.grid
        if t * h * w != length:
            raise ValueError(f"grid {t}x{h}x{w} of {modality} does not hold its {length} positions")
        steps = (torch.arange(t, dtype=torch.float64) * lay.step).long()
        ti, hi, wi = torch.meshgrid(steps, torch.arange(h), torch.arange(w), indexing="ij")
        run = torch.stack([ti.reshape(-1), hi.reshape(-1), wi.reshape(-1)]) + start        # (3, length)
        return run, start + max(h, w) if lay.resume == "side" else int(run.max()) + 1

    def position_ids(self, attention_mask: torch.Tensor, spans: list[list[tuple[str, int, int]]]) -> torch.Tensor:
        batch, width = attention_mask.shape
        out = torch.zeros((3, batch, width), dtype=torch.long)
        for row in range(batch):
            runs = {start: (mod, length) for mod, start, length in spans[row]}
            col, nxt = int((attention_mask[row] == 0).sum()), 0
            while col < width:
                if col in runs:
                    mod, length = runs[col]
                    out[:, row, col:col + length], nxt = self._run(mod, length, nxt)
                    col += length
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
