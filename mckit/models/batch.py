"""Prompts with placeholders -> one left-padded batch: token ids, slots for projected inputs, positions, routes.

A prompt holds placeholders like ``<image>``; :func:`build_batch` tokenizes the
text around them and reserves ``n_tokens[m]`` positions per placeholder (the
branch's count: 1 for the toy's merged token, 576 for CLIP-L/336), marked with
the kit's own :data:`PLACEHOLDER_ID` (never a real token, never the pad).
Every position carries a route id: 0 for text (and padding, and tokens
generated later), ``route_ids[m]`` for the positions of a modality-``m`` input;
per-token routed layers (:mod:`mckit.models.routing`) read them.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: Token id of a position reserved for a projected input (negative: no tokenizer has it; the embedding is
#: written by the MLLM, never looked up).
PLACEHOLDER_ID = -1
#: Route id of text positions.
TEXT_ROUTE = 0


PLACEHOLDER = re.compile(r"<([A-Za-z_]+)>")


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

    input_ids, attention_mask, labels, routes: (B, L); labels is -100 except on answer
    tokens; input_ids is :data:`PLACEHOLDER_ID` at reserved positions; routes is the route
    id of each position. position_ids: (B, L), or whatever the model's adapter makes
    (e.g. (3, B, L) for Qwen2-VL's M-RoPE). ``slots[m]`` is (rows, cols) int64
    (N_m * n_tokens,) positions that receive modality ``m``'s projected tokens, in the
    order of ``feats[m]`` (N_m, T, d_enc).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    slots: dict[str, tuple[torch.Tensor, torch.Tensor]]
    feats: dict[str, torch.Tensor]
    routes: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> "Batch":
        """The same batch on ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.attention_mask), move(self.position_ids), move(self.labels),
                     {m: (r.to(device), c.to(device)) for m, (r, c) in self.slots.items()},
                     {m: f.to(device) for m, f in self.feats.items()}, move(self.routes))


def _count_inputs(item: int, inputs: dict, placeholders: list[str], known: dict[str, int]) -> None:
    for mod in set(placeholders) | set(inputs):
        if mod not in known:
            raise ValueError(f"item {item}: unknown modality {mod!r}; this model has {sorted(known)}")
        n_ph, n_in = placeholders.count(mod), len(inputs.get(mod, []))
        if n_ph != n_in:
            raise ValueError(
                f"item {item}: {n_ph} <{mod}> placeholder(s) but {n_in} {mod} input(s); each placeholder needs one input"
            )


def _tokenize(tokenizer, item: int, prompt: str, inputs: dict, n_tokens: dict[str, int],
              answer: str | None) -> tuple[list[int], list[int], list[tuple[str, int]]]:
    """One prompt -> (token ids with reserved runs, labels, [(modality, start) of each run])."""
    parts = split_prompt(prompt)
    _count_inputs(item, inputs, [p[0] for p in parts if isinstance(p, tuple)], n_tokens)
    ids: list[int] = []
    slots: list[tuple[str, int]] = []
    for part in parts:
        if isinstance(part, tuple):
            slots.append((part[0], len(ids)))
            ids.extend([PLACEHOLDER_ID] * n_tokens[part[0]])
        else:
            ids.extend(tokenizer(part, add_special_tokens=False)["input_ids"])
    labels = [-100] * len(ids)
    if answer is not None:
        ans = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = ids + ans, labels + ans
    return ids, labels, slots


def default_positions(attention_mask: torch.Tensor, spans: list[list[tuple[str, int, int]]]) -> torch.Tensor:
    """1-D positions of a left-padded batch: 0, 1, 2 ... from each row's first real token (padding: 0)."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def build_batch(tokenizer, prompts: list[str], feats: list[dict[str, list[torch.Tensor]]],
                n_tokens: dict[str, int], answers: list[str] | None = None,
                route_ids: dict[str, int] | None = None,
                positions: Callable[[torch.Tensor, list], torch.Tensor] = default_positions) -> Batch:
    """Tokenize chat prompts around their placeholders and reserve ``n_tokens[m]`` slots each.

    prompts: full chat strings (see :func:`mckit.world.tasks.chat`) with placeholders.
    feats: per item, modality -> encoder features (T, d_enc), one per placeholder in order.
    answers: appended after the prompt with ``</s>``; their tokens are the only labels.
    route_ids: modality -> route id of its positions (default: 1, 2, ... in the order of ``n_tokens``).
    positions: ``(attention_mask, spans) -> position_ids``, spans per row being (modality, start, length)
    of each reserved run: the model adapter's rule (default :func:`default_positions`).
    """
    route_ids = route_ids or {m: i + 1 for i, m in enumerate(n_tokens)}
    rows = [_tokenize(tokenizer, i, prompt, feats[i], n_tokens, None if answers is None else answers[i])
            for i, prompt in enumerate(prompts)]
    rows_ids, rows_labels, rows_slots = (list(col) for col in zip(*rows))
    width = max(len(r) for r in rows_ids)
    n = len(prompts)
    input_ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((n, width), -100, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    routes = torch.full((n, width), TEXT_ROUTE, dtype=torch.long)
    spans: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
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
            routes[i, off + start:off + start + n_tokens[mod]] = route_ids[mod]
            spans[i].append((mod, off + start, n_tokens[mod]))
    return Batch(
        input_ids, mask, positions(mask, spans), labels if answers is not None else None,
        {m: (torch.tensor(slot_rows[m]), torch.tensor(slot_cols[m])) for m in stacked},
        {m: torch.stack(v) for m, v in stacked.items()}, routes,
    )
