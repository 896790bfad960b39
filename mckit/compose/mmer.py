"""MMER (METHODS.md 5): one TIES-merged task vector and a binary mask per modality over it.

From the full fine-tunes' task vectors tau_i = theta_i - theta_0 (LLM weights only):

1. tau* = TIES(tau_1 .. tau_N; keep K)  (trim to the top K of each tau_i by magnitude, elect the
   sign gamma = sign(sum_i trimmed_i), disjoint mean of the agreeing entries);
   theta* = theta_0 + tau*.  Trimming per tensor or over the whole model: ``scope``.
2. m_i = [sign(tau_i) == sign(tau*)]  AND  [|tau_i| >= lambda_i * 0.5 * |tau*|]    (entry-wise)
   ``trimmed``: whether tau_i here is the trimmed task vector of step 1 (the paper does not say).
3. expansion (inputs of several modalities, :func:`expand`): per-token routing of q, k, v, o,
   gate, up, down; a position of modality i runs W_0 + m_i * tau*, text and generated positions
   W_0 + mean_i(m_i) * tau* (a fractional mask); attention stays joint.  A weight no route can
   carry (none in the toy models) takes the text delta everywhere.
4. retention (one modality's input, :func:`retain`): theta_i_hat = theta_0 + m_i * tau* for the
   whole model, with encoder i.
5. storage: theta_0 + tau* + one bit per parameter per modality (:func:`save_masks`).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mckit.compose.routed import TEXT, routed_compose
from mckit.compose.static import add_deltas, as_dict, check_models, check_same_base, coefficients, with_llm
from mckit.merge.methods import disjoint_mean, elect_sign, magnitude_threshold, trim
from mckit.merge.registry import check_fraction
from mckit.merge.task_vectors import task_vector
from mckit.merge.thresholds import streamed_magnitude_threshold
from mckit.models.mllm import MLLM
from mckit.models.routing import LINEARS
from mckit.storage.atomic import atomic_write_bytes

#: The paper's K: fraction of each task vector KEPT by TIES's trim.
KEEP = 0.8
#: Where TIES's top-K is taken: in each tensor, or over the whole LLM at once.
SCOPES = ("tensor", "global")
#: On-disk format tag of :func:`save_masks`.
FORMAT = "mckit-mmer-masks/1"


def check_keep(keep: float) -> float:
    """K in (0, 1] (a fraction kept), else ValueError naming K."""
    return check_fraction("K (keep)", keep)


def check_lams(lam, n: int) -> list[float]:
    """lambda as ``n`` values in (0, 2] (one number for every modality, or one each); errors name the value."""
    lams = coefficients(lam, n, "lam")
    for i, value in enumerate(lams):
        if not 0 < value <= 2:
            raise ValueError(f"lam[{i}] = {value} is outside (0, 2]: the magnitude test keeps |tau_i| >= "
                             "lam * 0.5 * |tau*|")
    return lams


def routable(name: str) -> bool:
    """Whether weight ``name`` belongs to one of the seven linears per-token routing carries."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEARS


def merged_task_vector(taus: Sequence[Mapping[str, Tensor]], keep: float = KEEP,
                       scope: str = "tensor") -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """tau* = TIES(tau_1 .. tau_N; keep K), per weight name, and the trimmed tau_i.

    ``scope="tensor"``: each tau_i trimmed to its top K within each tensor; ``"global"``: to its top K over
    every tensor at once (one magnitude threshold per model). A weight missing from a tau_i counts as 0.
    Returns ``(tau_star, trimmed)``: ``{name: (out, in)}`` and one such dict per model.
    """
    keep = check_keep(keep)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    if not taus:
        raise ValueError("no task vectors to merge")
    names = sorted({n for t in taus for n in t})
    full = [{n: t[n].float() if n in t else torch.zeros_like(next(u[n] for u in taus if n in u).float())
             for n in names} for t in taus]
    if scope == "global":
        global_thr = [streamed_magnitude_threshold(lambda t=t: (t[n] for n in names), keep) for t in full]
    tau_star: dict[str, Tensor] = {}
    trimmed: list[dict[str, Tensor]] = [{} for _ in full]
    for name in names:
        cut = [trim(t[name], global_thr[i] if scope == "global" else magnitude_threshold(t[name], keep))
               for i, t in enumerate(full)]
        tau_star[name] = disjoint_mean(cut, elect_sign(cut))
        for i, c in enumerate(cut):
            trimmed[i][name] = c
    return tau_star, trimmed


def modality_mask(tau_i: Tensor, tau_star: Tensor, lam: float, sign_test: bool = True,
                  magnitude_test: bool = True) -> Tensor:
    """m_i = [sign(tau_i) == sign(tau*)] AND [|tau_i| >= lam * 0.5 * |tau*|], a bool tensor of tau*'s shape.

    ``sign_test`` / ``magnitude_test`` = False drops that test (the paper's ablations).
    """
    mask = torch.ones_like(tau_star, dtype=torch.bool)
    if sign_test:
        mask &= torch.sign(tau_i) == torch.sign(tau_star)
    if magnitude_test:
        mask &= tau_i.abs() >= lam * 0.5 * tau_star.abs()
    return mask


def fingerprint(taus: Mapping[str, Mapping[str, Tensor]]) -> str:
    """sha256 of the task vectors (modality, weight name, shape, float32 bytes): which models masks belong to."""
    digest = hashlib.sha256()
    for mod in sorted(taus):
        for name in sorted(taus[mod]):
            t = taus[mod][name].detach().float().contiguous()
            digest.update(f"{mod}\0{name}\0{tuple(t.shape)}\0".encode())
            digest.update(t.numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Masks:
    """tau* and one mask per modality over it, with the options and the task vectors' fingerprint."""

    modalities: tuple[str, ...]
    tau_star: dict[str, Tensor]
    masks: dict[str, dict[str, Tensor]]            # modality -> weight name -> bool tensor like tau*
    options: dict = field(default_factory=dict)    # keep, scope, lam, trimmed, sign_test, magnitude_test
    fingerprint: str = ""

    def delta(self, mod: str) -> dict[str, Tensor]:
        """m_i * tau* per weight (modality ``mod``'s delta)."""
        return {n: self.masks[mod][n] * t for n, t in self.tau_star.items()}

    def mean_mask(self) -> dict[str, Tensor]:
        """mean_i m_i per weight (float32): the text positions' fractional mask."""
        return {n: torch.stack([self.masks[m][n] for m in self.modalities]).float().mean(0) for n in self.tau_star}

    def density(self) -> dict[str, float]:
        """Fraction of parameters each modality's mask keeps."""
        total = sum(t.numel() for t in self.tau_star.values())
        return {m: sum(int(k.sum()) for k in self.masks[m].values()) / total for m in self.modalities}


def modality_masks(taus: Mapping[str, Mapping[str, Tensor]], tau_star: Mapping[str, Tensor],
                   trimmed: Sequence[Mapping[str, Tensor]] | None, lam=1.0, sign_test: bool = True,
                   magnitude_test: bool = True) -> dict[str, dict[str, Tensor]]:
    """Each modality's :func:`modality_mask` over every weight of tau*; ``trimmed`` given: tests read the
    trimmed tau_i (in ``taus``' order) instead of tau_i."""
    lams = check_lams(lam, len(taus))
    source = list(trimmed) if trimmed is not None else list(taus.values())
    out = {}
    for (mod, tau), lam_i in zip(zip(taus, source), lams):
        out[mod] = {n: modality_mask(tau[n].float() if n in tau else torch.zeros_like(t), t, lam_i, sign_test,
                                     magnitude_test) for n, t in tau_star.items()}
    return out


def build_masks(taus: Mapping[str, Mapping[str, Tensor]], keep: float = KEEP, scope: str = "tensor", lam=1.0,
                trimmed: bool = False, sign_test: bool = True, magnitude_test: bool = True) -> Masks:
    """tau* (:func:`merged_task_vector`) and every modality's mask; ``taus``: {modality: task vector}."""
    lams = check_lams(lam, len(taus))
    tau_star, cut = merged_task_vector(list(taus.values()), keep, scope)
    masks = modality_masks(taus, tau_star, cut if trimmed else None, lams, sign_test, magnitude_test)
    options = {"keep": keep, "scope": scope, "lam": lams, "trimmed": trimmed, "sign_test": sign_test,
               "magnitude_test": magnitude_test}
    return Masks(tuple(taus), tau_star, masks, options, fingerprint(taus))


def model_task_vectors(models, base: torch.nn.Module) -> dict[str, dict[str, Tensor]]:
    """{modality: tau} of single-modality models over ``base`` (same base checked)."""
    models = as_dict(models)
    check_models(models)
    check_same_base(models, base)
    return {mod: task_vector(model, base) for mod, model in models.items()}


def expansion_deltas(masks: Masks) -> dict[str, dict[str, Tensor]]:
    """Routes of the expansion: ``text`` -> mean_i(m_i) * tau*, modality i -> m_i * tau* (routable weights;
    any other weight takes the text delta on every route)."""
    text = {n: w * masks.tau_star[n] for n, w in masks.mean_mask().items()}
    routes = {TEXT: text}
    for mod in masks.modalities:
        own = masks.delta(mod)
        routes[mod] = {n: own[n] if routable(n) else text[n] for n in own}
    return routes


def _check_masks_fit(models: Mapping[str, MLLM], masks: Masks) -> None:
    """The masks are those of exactly these models (one per modality)."""
    missing = set(models) - set(masks.modalities)
    if missing:
        raise ValueError(f"the masks have no {sorted(missing)[0]} mask (they hold {list(masks.modalities)})")
    if set(masks.modalities) != set(models):
        raise ValueError(f"the masks were built for {list(masks.modalities)}, the expansion composes "
                         f"{list(models)}: build masks from the composed models")


def mmer_masks(models, base: torch.nn.Module, keep: float = KEEP, scope: str = "tensor", lam=1.0,
               trimmed: bool = False, sign_test: bool = True, magnitude_test: bool = True) -> Masks:
    """:func:`build_masks` from full fine-tuned single-modality ``models`` (list or {modality: model})."""
    return build_masks(model_task_vectors(models, base), keep, scope, lam, trimmed, sign_test, magnitude_test)


def expand(models, base: torch.nn.Module, masks: Masks) -> MLLM:
    """MMER's expansion: every model's branch over theta_0, each position routed by its modality (module doc)."""
    models = as_dict(models)
    _check_masks_fit(models, masks)
    check_masks(masks, model_task_vectors(models, base))
    return routed_compose(models, base, expansion_deltas(masks))


def retain(model: MLLM, base: torch.nn.Module, masks: Masks, key: str | None = None) -> MLLM:
    """MMER's retention: theta_0 + m_i * tau* for the whole LLM, with the model's own branch (modality i).

    ``key``: the mask to use when it is not the model's modality (a second expert of one modality, as in the
    forgetting protocol: ``"image+partner"``).
    """
    models = as_dict([model])
    key = key or model.modalities[0]
    if key not in masks.modalities:
        raise ValueError(f"the masks have no {key} mask (they hold {list(masks.modalities)})")
    check_same_base(models, base)
    return with_llm(add_deltas(base, masks.delta(key)), models)


def check_masks(masks: Masks, taus: Mapping[str, Mapping[str, Tensor]]) -> None:
    """Masks must match the task vectors they are applied with: same weights and shapes, same fingerprint."""
    for mod, tau in taus.items():
        for name, t in tau.items():
            if name not in masks.tau_star:
                raise ValueError(f"the masks have no tensor {name!r} (the {mod} model changed it)")
            if tuple(t.shape) != tuple(masks.tau_star[name].shape):
                raise ValueError(f"tensor {name!r}: masks of shape {tuple(masks.tau_star[name].shape)}, the {mod} "
                                 f"model's {tuple(t.shape)}: masks built for other models")
    want = fingerprint({m: taus[m] for m in masks.modalities if m in taus}) \
        if set(masks.modalities) <= set(taus) else None
    if masks.fingerprint and want is not None and want != masks.fingerprint:
        raise ValueError("the masks were built from other task vectors (fingerprint "
                         f"{masks.fingerprint[:12]} != {want[:12]} of these models); rebuild them")


# ------------------------------------------------------------------ storage
def pack(mask: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 entries per byte (numpy ``packbits``, big-endian bit order)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack(packed: Tensor, shape: Sequence[int]) -> Tensor:
    """Inverse of :func:`pack`: the first prod(shape) bits as a bool tensor of ``shape``."""
    count = math.prod(shape)
    if packed.numel() != (count + 7) // 8:
        raise ValueError(f"{packed.numel()} packed bytes cannot hold a mask of shape {tuple(shape)}")
    return torch.from_numpy(np.unpackbits(packed.numpy(), count=count).astype(bool)).reshape(tuple(shape))


def save_masks(masks: Masks, path: str | Path, overwrite: bool = False) -> Path:
    """One safetensors file: tau* (float32) and each mask bit-packed, options and fingerprint in its metadata.

    Written atomically; an existing file needs ``overwrite=True``.
    """
    from safetensors.torch import save

    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    tensors = {f"tau_star.{n}": t.float().contiguous() for n, t in masks.tau_star.items()}
    for mod in masks.modalities:
        tensors.update({f"mask.{mod}.{n}": pack(m) for n, m in masks.masks[mod].items()})
    meta = {"format": FORMAT, "modalities": json.dumps(list(masks.modalities)), "options": json.dumps(masks.options),
            "shapes": json.dumps({n: list(t.shape) for n, t in masks.tau_star.items()}),
            "fingerprint": masks.fingerprint}
    return atomic_write_bytes(path, save(tensors, metadata=meta))


def load_masks(path: str | Path, taus: Mapping[str, Mapping[str, Tensor]] | None = None) -> Masks:
    """Masks written by :func:`save_masks`; ``taus`` given: checked against them (:func:`check_masks`)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no mask file")
    try:
        with safe_open(str(path), "pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise ValueError(f"{path}: not a safetensors file ({err})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an MMER mask file (format {meta.get('format')!r}, expected {FORMAT!r})")
    mods, shapes = tuple(json.loads(meta["modalities"])), json.loads(meta["shapes"])
    tau_star, masks = {}, {m: {} for m in mods}
    for name, shape in shapes.items():
        tau_star[name] = tensors[f"tau_star.{name}"]
        if list(tau_star[name].shape) != shape:
            raise ValueError(f"{path}: tensor tau_star.{name} has shape {list(tau_star[name].shape)}, its record "
                             f"{shape}")
        for m in mods:
            key = f"mask.{m}.{name}"
            if key not in tensors:
                raise ValueError(f"{path}: tensor {key} is missing")
            try:
                masks[m][name] = unpack(tensors[key], shape)
            except ValueError as err:
                raise ValueError(f"{path}: tensor {key}: {err}") from None
    out = Masks(mods, tau_star, masks, json.loads(meta["options"]), meta["fingerprint"])
    if taus is not None:
        check_masks(out, taus)
    return out


def storage_bytes(masks: Masks, base: torch.nn.Module) -> dict[str, int]:
    """Bytes of MMER's storage (theta_0 + tau* + packed masks) beside N separate fine-tuned LLMs."""
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    star = sum(t.numel() * 4 for t in masks.tau_star.values())
    bits = sum((t.numel() + 7) // 8 for t in masks.tau_star.values()) * len(masks.modalities)
    return {"base": base_bytes, "tau_star": star, "masks": bits, "mmer": base_bytes + star + bits,
            "separate_models": base_bytes * len(masks.modalities)}
