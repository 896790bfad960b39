"""Model composition without training: NaiveMC, task arithmetic, the frozen-LLM composition, controls.

Every composed model keeps each source model's encoder + projector (branches
are copied, never merged) and gets one LLM:

- NaiveMC (METHODS.md 2):   theta = theta_0 + (1/N) * sum_i tau_i
- task arithmetic:          theta = theta_0 + lambda * sum_i tau_i
- frozen composition:       theta = theta_0 (projector-only source models)
- any registered method:    theta = method(theta_0, [theta_0 + tau_i]) (:func:`method_compose`)

where tau_i is model i's task vector (for LoRA, the product dW_i = scale * B_i A_i,
never A and B averaged separately). The controls separate the causes of a gain
or a loss: ``dilution`` (theta_0 + tau_m / N with modality m alone: the 1/N
shrinkage without any other modality), ``all_projectors`` (model m's own LLM fed
every modality through the other models' projectors: the shared embedding
space without averaging) and the frozen LLM with projectors trained on the
instruction data (variant ``frozen`` of :mod:`mckit.build.world`).
"""

from __future__ import annotations

import copy
import math
import numbers
from collections.abc import Mapping

import torch

from mckit.merge.kernels import merge_tensor
from mckit.merge.methods import lora_delta, task_vector_sum
from mckit.merge.task_vectors import task_vector
from mckit.models.checkpoints import CheckpointError
from mckit.models.decoupled import is_decoupled
from mckit.models.lora import ADAPTER, folded, is_lora, lora_layers, plain_llm
from mckit.models.mllm import MLLM

#: LLM tensors stage 2 never trains: equal to the base's in every model built on it.
FROZEN_TENSORS = ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight")


def check_same_base(models: Mapping[str, MLLM], base: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless every model was built on ``base`` (frozen tensors equal)."""
    ref = base.state_dict()
    for mod, model in models.items():
        state = plain_llm(model.llm).state_dict()
        for name in FROZEN_TENSORS:
            key = next((k for k in state if k.endswith(name)), None)
            if key is None or state[key].shape != ref[name].shape or not torch.equal(state[key], ref[name]):
                raise CheckpointError(f"the {mod} model was built on another base LLM: tensor {name!r} differs "
                                      "from the base's; models can only be composed over one base")


def check_models(models: Mapping[str, MLLM], decoupled: bool | None = False) -> None:
    """At least one model, each single-modality and keyed by its modality; ``decoupled``: every model must be
    one of DAMC's decoupled models (True), none may be (False, the default), or either (None)."""
    if not models:
        raise ValueError("nothing to compose: no models given (an empty list or dict); give at least one model")
    for mod, model in models.items():
        if model.modalities != [mod]:
            raise ValueError(f"models must be single-modality and keyed by their modality; the model under "
                             f"{mod!r} has {model.modalities}")
        if decoupled is not None and is_decoupled(model.llm) != decoupled:
            raise ValueError(f"the {mod} model is decoupled (a text and a modality LoRA): compose decoupled models "
                             "with mckit.compose.damc.damc" if not decoupled else
                             f"the {mod} model is not decoupled; DAMC composes decoupled models only (variant "
                             "'decoupled'); for plain LoRA models, damc_inference_only copies one LoRA into both "
                             "routes")


def as_dict(models) -> dict[str, MLLM]:
    """A list of single-modality models -> {modality: model}; a duplicated modality is an error."""
    if isinstance(models, Mapping):
        return dict(models)
    out: dict[str, MLLM] = {}
    for model in models:
        for mod in model.modalities:
            if mod in out:
                raise ValueError(f"modality {mod!r} appears twice; compose at most one model per modality")
            out[mod] = model
    return out


def with_llm(llm: torch.nn.Module, models: Mapping[str, MLLM]) -> MLLM:
    """One MLLM: ``llm`` and a copy of every model's branch (encoder + projector)."""
    any_model = next(iter(models.values()))
    branches = {mod: copy.deepcopy(m.branches[mod]) for mod, m in models.items()}
    return MLLM(llm, any_model.tokenizer, branches).eval()


def add_deltas(base: torch.nn.Module, deltas: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of ``base`` with ``deltas`` added to the named weights (float32 maths)."""
    llm = copy.deepcopy(base)
    state = llm.state_dict()
    with torch.no_grad():
        for name, delta in deltas.items():
            state[name].copy_((state[name].float() + delta).to(state[name].dtype))
    return llm.eval()


def coefficients(lam, n: int, name: str = "lam") -> list[float]:
    """``lam`` as ``n`` coefficients: one number (the same for every model) or one per model, each finite.

    Numpy and torch numbers or arrays are read as Python ones. Raises ValueError naming
    the coefficient (``lam`` or ``lam[i]``) that is not a finite number.
    """
    lam = lam.tolist() if hasattr(lam, "tolist") else lam
    single = not isinstance(lam, (list, tuple))
    lams = [lam] * n if single else list(lam)
    if len(lams) != n:
        raise ValueError(f"{len(lams)} coefficients {name} for {n} models; give one number or one per model")
    for i, value in enumerate(lams):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"coefficient {name if single else f'{name}[{i}]'} = {value!r} is not a finite number")
    return [float(v) for v in lams]


def merged_deltas(taus: list[dict[str, torch.Tensor]], lam: float | list[float]) -> dict[str, torch.Tensor]:
    """sum_i lambda_i * tau_i per tensor (a tensor missing from a task vector counts as zero).

    ``lam``: one number, or one per task vector; every coefficient must be finite.
    """
    lams = coefficients(lam, len(taus))
    names = sorted({n for t in taus for n in t})
    out = {}
    for name in names:
        ref = next(t[name] for t in taus if name in t)
        out[name] = task_vector_sum([t.get(name, torch.zeros_like(ref)) for t in taus], lams)
    return out


def task_arithmetic_compose(models, base: torch.nn.Module, lam: float | list[float]) -> MLLM:
    """theta_0 + sum_i lambda_i * tau_i, with every model's branch. ``models``: list or {modality: model}.

    ``lam``: one coefficient for every model or one per model (see :func:`coefficients`).
    """
    models = as_dict(models)
    check_models(models)
    lams = coefficients(lam, len(models))
    check_same_base(models, base)
    taus = [task_vector(m, base) for m in models.values()]
    return with_llm(add_deltas(base, merged_deltas(taus, lams)), models)


def naivemc(models, base: torch.nn.Module) -> MLLM:
    """NaiveMC: theta_0 + (1/N) sum_i tau_i (LoRA: average of the products B A), every branch kept."""
    models = as_dict(models)
    check_models(models)
    return task_arithmetic_compose(models, base, 1.0 / len(models))


def method_deltas(taus: list[dict[str, torch.Tensor]], base: torch.nn.Module, method: str,
                  **options) -> dict[str, torch.Tensor]:
    """Per weight: ``method(theta_0, [theta_0 + tau_i for i], **options) - theta_0`` (float32).

    The registry's defaults fill the options; DARE masks are seeded per weight name
    (:func:`mckit.merge.kernels.merge_tensor`), as in the streaming engine. A weight
    missing from a task vector counts as unchanged (tau_i = 0) for that model.
    """
    ref = base.state_dict()
    deltas = {}
    for name in sorted({n for t in taus for n in t}):
        theta_0 = ref[name].float()
        thetas = [theta_0 + t[name] if name in t else theta_0 for t in taus]
        deltas[name] = merge_tensor(method, name, theta_0, thetas, options) - theta_0
    return deltas


def method_compose(models, base: torch.nn.Module, method: str, **options) -> MLLM:
    """theta_0 + the registered ``method``'s merged delta (:func:`method_deltas`), with every model's branch."""
    models = as_dict(models)
    check_models(models)
    check_same_base(models, base)
    taus = [task_vector(m, base) for m in models.values()]
    return with_llm(add_deltas(base, method_deltas(taus, base, method, **options)), models)


def frozen_compose(models, base: torch.nn.Module) -> MLLM:
    """The frozen-LLM composition: theta_0 itself with every model's projector (models must not change the LLM)."""
    models = as_dict(models)
    check_models(models)
    check_same_base(models, base)
    for mod, model in models.items():
        if task_vector(model, base):
            raise ValueError(f"the {mod} model changed its LLM; the frozen composition takes projector-only models")
    return with_llm(copy.deepcopy(base).eval(), models)


def dilution_control(model: MLLM, base: torch.nn.Module, n: int) -> MLLM:
    """Control "dilution": theta_0 + tau_m / N with modality m's branch only (NaiveMC's shrinkage, no conflict)."""
    if n < 1:
        raise ValueError(f"dilution control: n (the number of composed models) must be >= 1, got {n}")
    return task_arithmetic_compose({model.modalities[0]: model}, base, 1.0 / n)


def all_projectors_control(model: MLLM, others) -> MLLM:
    """Control "all projectors": model m's own LLM, fed every modality through its source model's projector."""
    others = as_dict(others)
    mod = model.modalities[0]
    branches = {m: o for m, o in others.items() if m != mod}
    return with_llm(_merged_copy(model), {mod: model, **branches})


def _merged_copy(model: MLLM) -> torch.nn.Module:
    """A plain LLM equal to ``model``'s (LoRA folded into the weights)."""
    return folded(copy.deepcopy(model.llm))


def lora_factor_average(models, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trap NaiveMC avoids: scale * mean_i(B_i) @ mean_i(A_i) per linear (NOT the average update).

    Returned as deltas keyed by weight name, to compare with the correct
    ``mean_i(scale * B_i A_i)`` of :func:`merged_deltas`.
    """
    models = as_dict(models)
    check_models(models)
    layers = [dict(lora_layers(m.llm)) for m in models.values()]
    out = {}
    for name, module in layers[0].items():
        A = torch.stack([mods[name].lora_A[ADAPTER].weight.float() for mods in layers]).mean(0)
        B = torch.stack([mods[name].lora_B[ADAPTER].weight.float() for mods in layers]).mean(0)
        out[name] = lora_delta(A, B, module.scaling[ADAPTER])
    return out


def lora_trap_table(models, base: torch.nn.Module) -> "pd.DataFrame":
    """Per adapted linear: ||mean(B) mean(A) - mean(B A)|| / ||mean(B A)||, the error of averaging factors."""
    import pandas as pd

    models = as_dict(models)
    check_models(models)
    right = merged_deltas([task_vector(m, base) for m in models.values()], 1.0 / len(models))
    wrong = lora_factor_average(models, base)
    rows = [{"tensor": name, "relative_error": float((wrong[name] - right[name]).norm() / right[name].norm())}
            for name in right]
    return pd.DataFrame(rows)


def lora_trap_summary(models, base: torch.nn.Module) -> "pd.DataFrame":
    """Statistics (count, mean, min, ...) of :func:`lora_trap_table`; empty when the models have no LoRA."""
    import pandas as pd

    if not any(is_lora(m.llm) for m in as_dict(models).values()):
        return pd.DataFrame()
    return lora_trap_table(models, base).describe()
