"""DAMC's parameter-decoupled MLLM: a text LoRA and a modality LoRA on every adapted linear, routed per token.

Every linear W0 of the seven (q, k, v, o, gate, up, down) of every layer becomes a
:class:`~mckit.models.routing.RoutedLinear` with two low-rank deltas (METHODS.md 3)::

    y = x (W0 + s * B_text A_text)^T     for text positions (and padding, and generated tokens)
    y = x (W0 + s * B_mod  A_mod )^T     for the positions of a modality input

A (r, d_in) and B (d_out, r), s = alpha / r, B = 0 at init (both deltas start at zero).
The positions of a modality input are its projected features framed by ``span``
learnable prefix and ``span`` learnable suffix embeddings (:class:`SpanProjector`,
zero at init), all on the modality's route. Both LoRAs train together on the same
stage-2 data as the plain LoRA variant.

On disk each LoRA is a ``peft`` LoRA adapter of its own (``adapter_config.json`` +
``adapter_model.safetensors``): ``PeftModel.from_pretrained(base, folder)`` loads either
one as an ordinary LoRA model; only the routing between them is the kit's.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from torch import nn

from mckit.models.batch import TEXT_ROUTE
from mckit.models.lora import PEFT_PREFIX
from mckit.models.mllm import MLLM, Branch
from mckit.models.routing import LINEARS, LowRankDelta, RoutedLinear, route_linears

#: Learnable embeddings before and after each modality input (the paper: 5 and 5).
SPAN = 5
#: Name of the text route's LoRA (the modality's is named after the modality).
TEXT = "text"


class SpanProjector(nn.Module):
    """A projector framed by learnable embeddings: (B, T_enc, d_enc) -> (B, span + n + span, d_llm).

    ``prefix`` and ``suffix`` (span, d_llm) start at zero and train with the projector.
    """

    def __init__(self, inner: nn.Module, hidden: int, span: int = SPAN):
        super().__init__()
        if span < 1:
            raise ValueError(f"span must be >= 1 learnable embeddings, got {span}")
        self.inner = inner
        self.prefix = nn.Parameter(torch.zeros(span, hidden))
        self.suffix = nn.Parameter(torch.zeros(span, hidden))

    @property
    def span(self) -> int:
        return self.prefix.shape[0]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        body = self.inner(feats)
        n = body.shape[0]
        return torch.cat([self.prefix.expand(n, -1, -1).to(body.dtype), body,
                          self.suffix.expand(n, -1, -1).to(body.dtype)], dim=1)


def framed(branch: Branch, hidden: int, span: int = SPAN) -> Branch:
    """A copy of ``branch`` whose projector is framed by ``span`` + ``span`` zero-initialised embeddings of
    width ``hidden`` (the LLM's; :class:`SpanProjector`); its inputs take ``2 * span`` more positions."""
    import copy

    if isinstance(branch.projector, SpanProjector):
        raise ValueError(f"branch {branch.modality} is already framed by learnable embeddings")
    return Branch(branch.modality, copy.deepcopy(branch.encoder), SpanProjector(copy.deepcopy(branch.projector),
                  hidden, span), branch.n_tokens + 2 * span, branch.projector_type, branch.input_shape)


def span_of(branch: Branch) -> int:
    """The number of learnable embeddings on each side of ``branch``'s inputs (0: not framed)."""
    return branch.projector.span if isinstance(branch.projector, SpanProjector) else 0


class LoRADelta(LowRankDelta):
    """A trainable LoRA delta: x -> s * (dropout(x) A^T) B^T; A (r, in) Kaiming-uniform as in peft, B (out, r) zero."""

    def __init__(self, d_in: int, d_out: int, rank: int, alpha: float, dropout: float = 0.0):
        A = torch.empty(rank, d_in)
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        super().__init__(A, torch.zeros(d_out, rank), alpha / rank)
        self.requires_grad_(True)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.dropout(x))


def add_decoupled_lora(llm: nn.Module, route: int, state, rank: int = 32, alpha: int | None = None,
                       dropout: float = 0.05) -> list[str]:
    """Route every linear of :data:`LINEARS` of a plain ``llm`` through a text LoRA (route 0) and a modality
    LoRA (``route``), both trainable and zero at init; in place. Returns the routed linears' names."""
    if route == TEXT_ROUTE:
        raise ValueError(f"the modality route must differ from the text route {TEXT_ROUTE}")
    alpha = alpha or 2 * rank
    deltas: dict[int, dict[str, nn.Module]] = {TEXT_ROUTE: {}, route: {}}
    for name, module in llm.named_modules():
        if name.rsplit(".", 1)[-1] in LINEARS and isinstance(module, nn.Linear):
            for r in deltas:
                deltas[r][name] = LoRADelta(module.in_features, module.out_features, rank, alpha, dropout)
    if not deltas[route]:
        raise ValueError(f"no linear called one of {LINEARS} in the LLM: nothing to decouple")
    return route_linears(llm, deltas, state)


def decouple(model: MLLM, rank: int = 32, alpha: int | None = None, dropout: float = 0.05,
             span: int = SPAN) -> MLLM:
    """A single-modality ``model`` made decoupled for training: its branch framed by learnable embeddings and its
    (plain) LLM's linears routed through a text and a modality LoRA, all zero at init. Copies; ``model`` is
    left as it was."""
    import copy

    if len(model.branches) != 1:
        raise ValueError(f"decouple one single-modality model at a time; this one has {model.modalities}")
    if is_decoupled(model.llm):
        raise ValueError("this model is already decoupled")
    (mod, branch), = model.branches.items()
    hidden = model.llm.get_input_embeddings().weight.shape[1]
    out = MLLM(copy.deepcopy(model.llm), model.tokenizer, {mod: framed(branch, hidden, span)})
    add_decoupled_lora(out.llm, out.route_ids[mod], out.route_state, rank, alpha, dropout)
    return out


def is_decoupled(llm: nn.Module) -> bool:
    """Whether ``llm`` carries routed low-rank deltas (a decoupled model)."""
    return any(isinstance(m, RoutedLinear) for m in llm.modules())


def route_factors(llm: nn.Module) -> dict[int, dict[str, LowRankDelta]]:
    """route id -> {weight name (``model.layers.0.self_attn.q_proj.weight``): its low-rank delta}."""
    out: dict[int, dict[str, LowRankDelta]] = {}
    for name, module in llm.named_modules():
        if isinstance(module, RoutedLinear):
            for route, delta in module.deltas.items():
                if not isinstance(delta, LowRankDelta):
                    raise ValueError(f"{name}: route {route} has a {type(delta).__name__}, not a low-rank delta")
                out.setdefault(int(route), {})[f"{name}.weight"] = delta
    return out


def decoupled_deltas(model) -> dict[str, dict[str, torch.Tensor]]:
    """A decoupled MLLM's dense deltas per route name: ``{"text": {weight: s B A}, modality: {...}}`` (float32,
    (out, in); products, never factors)."""
    names = {TEXT_ROUTE: TEXT, **{route: mod for mod, route in model.route_ids.items()}}
    factors = route_factors(model.llm)
    if not factors:
        raise ValueError("this model is not decoupled: its LLM has no routed low-rank deltas")
    unknown = set(factors) - set(names)
    if unknown:
        raise ValueError(f"the LLM has deltas for route id(s) {sorted(unknown)} but the model's routes are {names}")
    return {names[r]: {w: d.dense().float().detach() for w, d in per.items()} for r, per in factors.items()}


# --------------------------------------------------------------------------- peft layout on disk

def save_adapter(factors: dict[str, LowRankDelta], folder: Path, dropout: float = 0.05) -> None:
    """One route's LoRA as a peft adapter folder (config + ``adapter_model.safetensors``)."""
    any_delta = next(iter(factors.values()))
    rank = any_delta.A.shape[0]
    config = LoraConfig(r=rank, lora_alpha=round(any_delta.scale * rank), lora_dropout=dropout,
                        target_modules=list(LINEARS), bias="none")
    folder.mkdir(parents=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for weight, delta in factors.items():
        stem = PEFT_PREFIX + weight.removesuffix(".weight")
        tensors[f"{stem}.lora_A.weight"] = delta.A.detach().contiguous()
        tensors[f"{stem}.lora_B.weight"] = delta.B.detach().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
