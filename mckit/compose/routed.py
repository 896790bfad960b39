"""Routed composition: one LLM whose linears take a different delta on each modality's tokens.

Given per-route weight deltas (route "text" and one per modality), the composed
LLM's shared weight is theta_0 + delta_text and each modality route adds
delta_m - delta_text on its own tokens only (:class:`~mckit.models.routing.RoutedLinear`):

    y = x (W_0 + d_text)^T                  for text tokens (and every generated token)
    y = x (W_0 + d_text)^T + x (d_m - d_text)^T = x (W_0 + d_m)^T   for modality-m tokens

Folding the text delta into the shared weight keeps the routed forward one
plain matmul per linear plus the (few) modality tokens' share. DAMC and MMER's
expansion are routed compositions with particular deltas; :func:`modality_routed`
is the simplest one: text on the NaiveMC merge, each modality's tokens on its own model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mckit.compose.static import add_deltas, as_dict, check_models, check_same_base, merged_deltas, with_llm
from mckit.merge.task_vectors import task_vector
from mckit.models.mllm import MLLM
from mckit.models.routing import DenseDelta, route_linears

TEXT = "text"


def routed_compose(models, base: torch.nn.Module, deltas: Mapping[str, Mapping[str, torch.Tensor]]) -> MLLM:
    """Every model's branch over ``base``; route ``m``'s tokens get ``deltas[m]``, text gets ``deltas["text"]``.

    ``deltas[route][weight_name]``: dense float32 deltas ``(out, in)`` keyed like
    ``model.layers.0.self_attn.q_proj.weight``; a weight missing from a route counts as 0.
    """
    models = as_dict(models)
    check_models(models, decoupled=None)
    unknown = set(deltas) - {TEXT, *models}
    if unknown:
        raise ValueError(f"deltas for route(s) {sorted(unknown)} that no model provides; routes: text, {list(models)}")
    text = dict(deltas.get(TEXT, {}))
    composed = with_llm(add_deltas(base, text), models)
    per_route: dict[int, dict[str, DenseDelta]] = {}
    for mod, route in composed.route_ids.items():
        own = deltas.get(mod, {})
        for name in sorted(set(own) | set(text)):
            ref = own.get(name, text.get(name))
            diff = own.get(name, torch.zeros_like(ref)) - text.get(name, torch.zeros_like(ref))
            if diff.abs().max() > 0:
                per_route.setdefault(route, {})[name.removesuffix(".weight")] = DenseDelta(diff.float())
    route_linears(composed.llm, per_route, composed.route_state, merge=True)
    return composed.eval()


def modality_routed(models, base: torch.nn.Module) -> MLLM:
    """Text on NaiveMC's theta_0 + mean_i tau_i; modality m's tokens on theta_0 + tau_m (its own model's LLM)."""
    models = as_dict(models)
    check_models(models)
    check_same_base(models, base)
    taus = {mod: task_vector(model, base) for mod, model in models.items()}
    deltas = {TEXT: merged_deltas(list(taus.values()), 1.0 / len(taus)), **taus}
    return routed_compose(models, base, deltas)
