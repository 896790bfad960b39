"""The MLLM abstraction: one causal LM + named modality branches + placeholder splicing.

An :class:`MLLM` is a plain ``transformers`` causal LM (optionally wrapped by
``peft`` LoRA) and a dict of :class:`Branch` es, one per modality, each a
frozen encoder and a trainable projector. A prompt holds placeholders like
``<image>``; :func:`build_batch` tokenizes the text around them and reserves
one position per placeholder, and :meth:`MLLM.embed` writes the projected
feature into that position of the token embeddings. One token per input (the
encoder's tokens are merged by the projector, like InternVL's pixel shuffle)
makes ``image : <image>`` read exactly like ``name : bako`` in the text the
base LM was pretrained on, which is what lets a tiny LM align per slot. Any number
of modalities, in any order, in one prompt: composition methods only differ
in which branches they attach and how the LLM's weights were merged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from mckit.models.encoders import ENC_DIM, ENC_TOKENS, make_encoder

PLACEHOLDER = re.compile(r"<([A-Za-z_]+)>")
#: Projector type per modality, as in the paper (mlp2x_gelu; a small Q-Former for audio).
PROJECTOR_TYPE = {"image": "mlp2x_gelu", "audio": "qformer", "video": "mlp2x_gelu", "point": "mlp2x_gelu"}
QFORMER_QUERIES = 4
#: LLM positions one input occupies, for every projector type.
N_TOKENS = 1


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


class Branch(nn.Module):
    """One modality: a frozen encoder and a projector into the LLM's embedding space."""

    def __init__(self, modality: str, hidden: int, projector: str | None = None):
        super().__init__()
        self.modality = modality
        self.projector_type = projector or PROJECTOR_TYPE[modality]
        self.encoder = make_encoder(modality).eval().requires_grad_(False)
        self.projector = make_projector(self.projector_type, hidden, ENC_TOKENS[modality])

    @property
    def n_tokens(self) -> int:
        """LLM positions one input of this modality occupies."""
        return N_TOKENS

    @torch.no_grad()
    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: raw batch -> (B, T_enc, d_enc) features."""
        return self.encoder(raw)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T_enc, d_enc) -> (B, 1, d_llm)."""
        return self.projector(feats)


def split_prompt(prompt: str) -> list[str | tuple[str]]:
    """Text pieces and placeholders, in order: ``"a <image> b"`` -> ``["a", ("image",), "b"]``."""
    parts: list[str | tuple[str]] = []
    pos = 0
    for m in PLACEHOLDER.finditer(prompt):
        if prompt[pos:m.start()].strip():
            parts.append(prompt[pos:m.start()].strip())
        parts.append((m.group(1),))
        pos = m.end()
    if prompt[pos:].strip():
        parts.append(prompt[pos:].strip())
    return parts


@dataclass
class Batch:
    """A left-padded batch ready for :meth:`MLLM.forward`.

    input_ids, attention_mask, position_ids, labels: (B, L); labels is -100 except on
    answer tokens. ``slots[m]`` is (rows, cols) int64 (N_m * n_tokens,) positions that
    receive modality ``m``'s projected tokens, in the order of ``feats[m]`` (N_m, T, d_enc).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]
    feats: dict[str, torch.Tensor]

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.labels),
                     {m: (r.to(device), c.to(device)) for m, (r, c) in self.slots.items()},
                     {m: f.to(device) for m, f in self.feats.items()})


def _count_inputs(item: int, inputs: dict, placeholders: list[str], known: dict[str, int]) -> None:
    for mod in set(placeholders) | set(inputs):
        if mod not in known:
            raise ValueError(f"item {item}: unknown modality {mod!r}; this model has {sorted(known)}")
        n_ph, n_in = placeholders.count(mod), len(inputs.get(mod, []))
        if n_ph != n_in:
            raise ValueError(
                f"item {item}: {n_ph} <{mod}> placeholder(s) but {n_in} {mod} input(s); each placeholder needs one input"
            )


def build_batch(tokenizer, prompts: list[str], feats: list[dict[str, list[torch.Tensor]]],
                n_tokens: dict[str, int], answers: list[str] | None = None) -> Batch:
    """Tokenize chat prompts around their placeholders and reserve ``n_tokens[m]`` slots each.

    prompts: full chat strings (see :func:`mckit.world.tasks.chat`) with placeholders.
    feats: per item, modality -> encoder features (T, d_enc), one per placeholder in order.
    answers: appended after the prompt with ``</s>``; their tokens are the only labels.
    """
    rows_ids, rows_labels, rows_slots = [], [], []
    for i, prompt in enumerate(prompts):
        parts = split_prompt(prompt)
        placeholders = [p[0] for p in parts if isinstance(p, tuple)]
        _count_inputs(i, feats[i], placeholders, n_tokens)
        ids: list[int] = []
        slots: list[tuple[str, int]] = []
        for part in parts:
            if isinstance(part, tuple):
                slots.append((part[0], len(ids)))
                ids.extend([tokenizer.pad_token_id] * n_tokens[part[0]])
            else:
                ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
        labels = [-100] * len(ids)
        if answers is not None:
            ans = tokenizer(answers[i], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids, labels = ids + ans, labels + ans
        rows_ids.append(ids)
        rows_labels.append(labels)
        rows_slots.append(slots)
    width = max(len(r) for r in rows_ids)
    n = len(prompts)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    slot_rows: dict[str, list[int]] = {}
    slot_cols: dict[str, list[int]] = {}
    stacked: dict[str, list[torch.Tensor]] = {}
    for i, (ids, lab, slots) in enumerate(zip(rows_ids, rows_labels, rows_slots)):
        off = width - len(ids)
        input_ids[i, off:] = torch.tensor(ids)
        labels[i, off:] = torch.tensor(lab)
        mask[i, off:] = 1
        seen: dict[str, int] = {}
        for mod, start in slots:
            k = seen.get(mod, 0)
            seen[mod] = k + 1
            stacked.setdefault(mod, []).append(feats[i][mod][k])
            slot_rows.setdefault(mod, []).extend([i] * n_tokens[mod])
            slot_cols.setdefault(mod, []).extend(range(off + start, off + start + n_tokens[mod]))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return Batch(
        input_ids, mask, position_ids, labels if answers is not None else None,
        {m: (torch.tensor(slot_rows[m]), torch.tensor(slot_cols[m])) for m in stacked},
        {m: torch.stack(v) for m, v in stacked.items()},
    )


class MLLM(nn.Module):
    """A causal LM with modality branches. ``llm`` may be a ``peft`` model (LoRA)."""

    def __init__(self, llm: nn.Module, tokenizer, branches: dict[str, Branch]):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.branches = nn.ModuleDict(branches)

    @property
    def modalities(self) -> list[str]:
        return list(self.branches)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def n_tokens(self) -> dict[str, int]:
        return {m: b.n_tokens for m, b in self.branches.items()}

    def encode_inputs(self, inputs: list[dict[str, list]]) -> list[dict[str, list[torch.Tensor]]]:
        """Raw inputs (arrays or tensors) -> encoder features, batched per modality."""
        out: list[dict[str, list[torch.Tensor]]] = [{} for _ in inputs]
        for mod in sorted({m for item in inputs for m in item}):
            if mod not in self.branches:
                raise ValueError(f"unknown modality {mod!r}; this model has {self.modalities}")
            raws = [torch.as_tensor(x, dtype=torch.float32, device=self.device) for item in inputs
                    for x in item.get(mod, [])]
            if not raws:
                continue
            feats = iter(self.branches[mod].encode(torch.stack(raws)))
            for i, item in enumerate(inputs):
                out[i][mod] = [next(feats) for _ in item.get(mod, [])]
        return out

    def batch(self, prompts: list[str], inputs: list[dict[str, list]], answers: list[str] | None = None,
              encoded: bool = False) -> Batch:
        """Build a :class:`Batch` from chat prompts and raw inputs (or encoder features if ``encoded``)."""
        feats = inputs if encoded else self.encode_inputs(inputs)
        return build_batch(self.tokenizer, prompts, feats, self.n_tokens, answers).to(self.device)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with every placeholder slot overwritten by projected features: (B, L, d_llm)."""
        embeds = self.llm.get_input_embeddings()(batch.input_ids)
        for mod, feats in batch.feats.items():
            rows, cols = batch.slots[mod]
            projected = self.branches[mod].project(feats).to(embeds.dtype)
            embeds = embeds.index_put((rows, cols), projected.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, batch: Batch):
        return self.llm(inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask,
                        position_ids=batch.position_ids, labels=batch.labels)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 12) -> list[str]:
        """Greedy decoding; returns the decoded answers (up to ``</s>``)."""
        out = self.llm.generate(
            inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask, max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
        )
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]

    def answer(self, prompts: list[str], inputs: list[dict[str, list]], max_new_tokens: int = 12) -> list[str]:
        """Chat prompts (with placeholders) + raw inputs -> greedy answers."""
        return self.generate(self.batch(prompts, inputs), max_new_tokens)
