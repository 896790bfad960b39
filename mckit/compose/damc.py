"""DAMC's composition (METHODS.md 3): decoupled models' text LoRAs merged, their modality LoRAs kept apart.

Each source model i is decoupled (:mod:`mckit.models.decoupled`): a text delta dW_i_text and a
modality delta dW_i (products s B A). The composed model routes every position::

    text positions (and generated tokens):    W0 + sum_i lambda_i * dW_i_text    (default lambda_i = 1/N)
    positions of modality m's inputs:         W0 + s_m * dW_m                   (default s_m = 1)

Modality LoRAs, projectors and the learnable embeddings around each input are copied as
they are; the coefficients scale deltas only (W0 keeps weight 1). ``text_method="ties"``
merges the text deltas with TIES (the registry's settings) instead of the weighted sum.
The routing itself is :func:`mckit.compose.routed.routed_compose`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from mckit.compose.routed import TEXT, routed_compose
from mckit.compose.static import as_dict, check_models, check_same_base, coefficients, merged_deltas, method_deltas
from mckit.models.decoupled import decoupled_deltas
from mckit.models.mllm import MLLM

#: How the text deltas are merged: the weighted sum (the paper's default) or TIES.
TEXT_METHODS = ("average", "ties")


def damc_coefficients(values, n: int, name: str, default: float) -> list[float]:
    """``values`` as ``n`` finite, non-negative coefficients (None: ``default`` for each); errors name ``name``."""
    if values is None:
        return [default] * n
    out = coefficients(values, n, name)
    for i, v in enumerate(out):
        if v < 0:
            raise ValueError(f"{name}[{i}] = {v} is negative; DAMC's coefficients scale deltas and are >= 0")
    return out


def text_deltas(deltas: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], base: torch.nn.Module,
                lams: list[float], text_method: str = "average") -> dict[str, torch.Tensor]:
    """The merged text delta per weight: sum_i lambda_i dW_i_text, or TIES over the lambda_i dW_i_text.

    ``deltas[modality]``: one model's :func:`decoupled_deltas`.
    """
    if text_method not in TEXT_METHODS:
        raise ValueError(f"unknown text_method {text_method!r}; expected one of {TEXT_METHODS}")
    taus = [d[TEXT] for d in deltas.values()]
    if text_method == "average":
        return merged_deltas(taus, lams)
    return method_deltas([{k: lam * v for k, v in t.items()} for t, lam in zip(taus, lams)], base, "ties")


def model_deltas(models: Mapping[str, MLLM]) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """Every decoupled model's deltas: ``{modality: {"text": {...}, modality: {...}}}``; a model without its
    modality's or the text's delta is an error naming it."""
    out = {}
    for mod, model in models.items():
        deltas = decoupled_deltas(model)
        for route in (TEXT, mod):
            if not deltas.get(route):
                raise ValueError(f"the {mod} model has no {route} delta: a decoupled model carries a text and a "
                                 f"modality LoRA")
        out[mod] = deltas
    return out


def damc(models, base: torch.nn.Module, lam=None, modality_scale=None, text_method: str = "average") -> MLLM:
    """DAMC over decoupled ``models`` (list or {modality: model}) built on ``base`` (theta_0).

    ``lam``: one coefficient or one per model for the text deltas (default 1/N); ``modality_scale``: one or one
    per model for the modality deltas (default 1); both finite and >= 0.
    """
    models = as_dict(models)
    check_models(models, decoupled=True)
    check_same_base(models, base)
    n = len(models)
    lams = damc_coefficients(lam, n, "lam", 1.0 / n)
    scales = damc_coefficients(modality_scale, n, "modality_scale", 1.0)
    deltas = model_deltas(models)
    routes = {TEXT: text_deltas(deltas, base, lams, text_method)}
    for (mod, d), scale in zip(deltas.items(), scales):
        routes[mod] = {k: scale * v for k, v in d[mod].items()}
    return routed_compose(models, base, routes)
