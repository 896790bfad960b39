"""Projectors from an encoder's tokens into the LLM's embedding space (LLaVA's mlp2x_gelu, a small Q-Former)."""

from __future__ import annotations

import torch
from torch import nn

from mckit.models.encoders import ENC_DIM

#: Projector type per modality, as in the paper (mlp2x_gelu; a small Q-Former for audio).
PROJECTOR_TYPE = {"image": "mlp2x_gelu", "audio": "qformer", "video": "mlp2x_gelu", "point": "mlp2x_gelu"}


QFORMER_QUERIES = 4


class MLP2xGELU(nn.Module):
    """LLaVA's ``mlp2x_gelu`` over merged tokens: Linear(T_enc * d_enc, d_llm) -> GELU -> Linear(d_llm, d_llm).

    (B, T_enc, d_enc) -> (B, 1, d_llm): the T_enc encoder tokens are concatenated
    into one vector first (token merging), so one input is one LLM position.
    """

    def __init__(self, hidden: int, enc_tokens: int, enc_dim: int = ENC_DIM):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(enc_tokens * enc_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.flatten(1)).unsqueeze(1)


class QFormer(nn.Module):
    """A small Q-Former: learned queries cross-attend to the encoder tokens (2 layers), then Linear.

    (B, T_enc, d_enc) -> (B, 1, d_llm): the ``n_queries`` outputs are fixed in number
    whatever the input length (as for audio of any duration), then concatenated and
    projected to one LLM position (token merging, as for the MLP projector).
    """

    def __init__(self, hidden: int, enc_dim: int = ENC_DIM, n_queries: int = QFORMER_QUERIES, n_layers: int = 2):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(n_queries, enc_dim) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(enc_dim, nhead=4, dim_feedforward=2 * enc_dim, dropout=0.0, batch_first=True)
            for _ in range(n_layers)
        )
        self.out = nn.Linear(n_queries * enc_dim, hidden)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        q = self.queries.expand(feats.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, feats)
        return self.out(q.flatten(1)).unsqueeze(1)


def make_projector(kind: str, hidden: int, enc_tokens: int) -> nn.Module:
    if kind == "mlp2x_gelu":
        return MLP2xGELU(hidden, enc_tokens)
    if kind == "qformer":
        return QFormer(hidden)
    raise ValueError(f"unknown projector type {kind!r}; expected 'mlp2x_gelu' or 'qformer'")
