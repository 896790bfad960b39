"""The MLLM abstraction: one causal LM + named modality branches, and one forward path through the LLM.

An :class:`MLLM` is a plain ``transformers`` causal LM (optionally wrapped by
``peft`` LoRA), an :class:`~mckit.models.adapters.LLMAdapter` that knows the
LLM's conventions (positions, the linears' names), and a dict of
:class:`Branch` es, one per modality, each an encoder and a projector with the
number of LLM positions one input takes. A prompt holds placeholders like
``<image>``; :func:`~mckit.models.batch.build_batch` reserves the positions and
:meth:`MLLM.embed` writes the projected features there. In the toy world one
input is one position (the encoder's tokens are merged by the projector, like
InternVL's pixel shuffle), which makes ``image : <image>`` read exactly like
``name : bako`` in the text the base LM was pretrained on.

Every use of the LLM (training losses, :meth:`MLLM.generate`, every evaluation
protocol) goes through :meth:`MLLM.forward`, which also hands the batch's
per-position route ids to the LLM's routed linears (:mod:`mckit.models.routing`).
"""

from __future__ import annotations

import torch
from torch import nn

from mckit.models.adapters import LLMAdapter, adapter_for
from mckit.models.batch import TEXT_ROUTE, Batch, build_batch
from mckit.models.encoders import ENC_TOKENS, make_encoder
from mckit.models.projectors import PROJECTOR_TYPE, make_projector
from mckit.models.routing import RouteState
from mckit.world.render import IMAGE_SIZE, N_FRAMES, N_POINTS, N_SAMPLES

#: Shape of one raw toy input per modality, as :mod:`mckit.world.render` draws it.
TOY_INPUT_SHAPE: dict[str, tuple[int, ...]] = {
    "image": (3, IMAGE_SIZE, IMAGE_SIZE), "audio": (N_SAMPLES,), "video": (N_FRAMES, IMAGE_SIZE, IMAGE_SIZE),
    "point": (N_POINTS, 6),
}


class Branch(nn.Module):
    """One modality: a frozen encoder, a projector into the LLM's embedding space, and its positions per input.

    ``encoder``: raw batch -> (B, T_enc, d_enc); ``projector``: (B, T_enc, d_enc) ->
    (B, n_tokens, d_llm). Any modules fit (a CLIP tower and LLaVA's projector with
    ``n_tokens=576``); :func:`toy_branch` builds the toy world's. ``input_shape``: the
    shape of one raw input, checked by :meth:`MLLM.encode_inputs` (None: not checked).
    """

    def __init__(self, modality: str, encoder: nn.Module, projector: nn.Module, n_tokens: int = 1,
                 projector_type: str = "custom", input_shape: tuple | None = None):
        super().__init__()
        if n_tokens < 1:
            raise ValueError(f"branch {modality}: n_tokens must be >= 1, got {n_tokens}")
        self.modality = modality
        self.projector_type = projector_type
        self.encoder = encoder.eval().requires_grad_(False)
        self.projector = projector
        self.n_tokens = int(n_tokens)
        self.input_shape = tuple(int(n) for n in input_shape) if input_shape is not None else None

    @torch.no_grad()
    def encode(self, raw: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: raw batch -> (B, T_enc, d_enc) features."""
        return self.encoder(raw)

    def project(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, T_enc, d_enc) -> (B, n_tokens, d_llm)."""
        out = self.projector(feats)
        if out.dim() != 3 or out.shape[1] != self.n_tokens:
            raise ValueError(f"branch {self.modality}: projector gave shape {tuple(out.shape)}, expected "
                             f"(B, {self.n_tokens}, d_llm)")
        return out


def toy_branch(modality: str, hidden: int, projector: str | None = None) -> Branch:
    """The toy world's branch of ``modality``: its small encoder, and mlp2x_gelu (audio: a Q-Former), 1 position."""
    kind = projector or PROJECTOR_TYPE[modality]
    return Branch(modality, make_encoder(modality), make_projector(kind, hidden, ENC_TOKENS[modality]), 1, kind,
                  TOY_INPUT_SHAPE[modality])


class MLLM(nn.Module):
    """A causal LM with modality branches. ``llm`` may be a ``peft`` model (LoRA)."""

    def __init__(self, llm: nn.Module, tokenizer, branches: dict[str, Branch], adapter: LLMAdapter | None = None):
        super().__init__()
        self.llm = llm
        self.tokenizer = tokenizer
        self.branches = nn.ModuleDict(branches)
        self.adapter = adapter or adapter_for(llm)
        #: Route ids of the batch being run, read by the LLM's routed linears.
        self.route_state = RouteState()

    @property
    def modalities(self) -> list[str]:
        return list(self.branches)

    @property
    def device(self) -> torch.device:
        return next(self.llm.parameters()).device

    @property
    def n_tokens(self) -> dict[str, int]:
        return {m: b.n_tokens for m, b in self.branches.items()}

    @property
    def route_ids(self) -> dict[str, int]:
        """Route id of each modality's positions: 1, 2, ... in branch order (text is 0)."""
        return {m: i + 1 for i, m in enumerate(self.branches)}

    def encode_inputs(self, inputs: list[dict[str, list]]) -> list[dict[str, list[torch.Tensor]]]:
        """Raw inputs (arrays or tensors) -> encoder features, batched per modality.

        Raises ValueError naming the item, the modality and the shape for an input that
        is not of its branch's ``input_shape`` (or, if that is None, of the first one's
        shape) or that holds NaN or inf.
        """
        out: list[dict[str, list[torch.Tensor]]] = [{} for _ in inputs]
        for mod in sorted({m for item in inputs for m in item}):
            if mod not in self.branches:
                raise ValueError(f"unknown modality {mod!r}; this model has {self.modalities}")
            raws = self._raw_inputs(inputs, mod)
            if raws is None:
                continue
            feats = iter(self.branches[mod].encode(raws))
            for i, item in enumerate(inputs):
                out[i][mod] = [next(feats) for _ in item.get(mod, [])]
        return out

    def _raw_inputs(self, inputs: list[dict[str, list]], mod: str) -> torch.Tensor | None:
        """Modality ``mod``'s raw inputs of every item stacked as float32, checked (see :meth:`encode_inputs`)."""
        expected = self.branches[mod].input_shape
        names, raws = [], []
        for i, item in enumerate(inputs):
            for k, x in enumerate(item.get(mod, [])):
                names.append(f"item {i}: {mod} input {k}")
                try:
                    raw = torch.as_tensor(x, dtype=torch.float32, device=self.device)
                except (TypeError, ValueError, RuntimeError):
                    raise ValueError(f"{names[-1]} is not a numeric array ({type(x).__name__})") from None
                shape = expected or (tuple(raws[0].shape) if raws else tuple(raw.shape))
                if tuple(raw.shape) != shape:
                    raise ValueError(f"{names[-1]} has shape {tuple(raw.shape)}, expected {shape}")
                raws.append(raw)
        if not raws:
            return None
        stacked = torch.stack(raws)
        bad = ~torch.isfinite(stacked)
        if bool(bad.any()):
            raise ValueError(f"{names[int(bad.nonzero()[0, 0])]} contains NaN or inf")
        return stacked

    def batch(self, prompts: list[str], inputs: list[dict[str, list]], answers: list[str] | None = None,
              encoded: bool = False) -> Batch:
        """Build a :class:`Batch` from chat prompts and raw inputs (or encoder features if ``encoded``)."""
        feats = inputs if encoded else self.encode_inputs(inputs)
        return build_batch(self.tokenizer, prompts, feats, self.n_tokens, answers, self.route_ids,
                           self.adapter.position_ids).to(self.device)

    def embed(self, batch: Batch) -> torch.Tensor:
        """Token embeddings with every placeholder slot overwritten by projected features: (B, L, d_llm)."""
        embeds = self.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
        for mod, feats in batch.feats.items():
            rows, cols = batch.slots[mod]
            projected = self.branches[mod].project(feats).to(embeds.dtype)
            embeds = embeds.index_put((rows, cols), projected.reshape(-1, embeds.shape[-1]))
        return embeds

    def forward(self, batch: Batch, past_key_values=None, use_cache: bool = False):
        """The one path through the LLM: embeddings, positions and per-token routes of ``batch``.

        With ``past_key_values`` the batch holds only new positions (``input_ids`` (B, t),
        their positions and routes) and ``attention_mask`` covers the cache and them.
        """
        routes = batch.routes if batch.routes is not None else torch.full_like(batch.input_ids, TEXT_ROUTE)
        with self.route_state.active(routes):
            return self.llm(inputs_embeds=self.embed(batch), attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, labels=batch.labels,
                            past_key_values=past_key_values, use_cache=use_cache)

    @torch.no_grad()
    def generate(self, batch: Batch, max_new_tokens: int = 12) -> list[str]:
        """Greedy decoding with a KV cache through :meth:`forward`; returns the answers decoded up to ``</s>``.

        Each step feeds the previous argmax token on the text route, at the next
        position of its row.
        """
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = self.forward(batch, use_cache=True)
        mask, cache = batch.attention_mask, out.past_key_values
        done = torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        tokens = []
        for step in range(max_new_tokens):
            nxt = out.logits[:, -1].argmax(-1).masked_fill(done, pad)
            tokens.append(nxt)
            done |= nxt == eos
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            step_batch = Batch(nxt[:, None], mask, self.adapter.next_positions(batch.position_ids, mask, step + 1),
                               None, {}, {}, torch.full_like(nxt[:, None], TEXT_ROUTE))
            out = self.forward(step_batch, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
        rows = torch.stack(tokens, dim=1).tolist() if tokens else [[] for _ in done]
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    def answer(self, prompts: list[str], inputs: list[dict[str, list]], max_new_tokens: int = 12) -> list[str]:
        """Chat prompts (with placeholders) + raw inputs -> greedy answers."""
        return self.generate(self.batch(prompts, inputs), max_new_tokens)
