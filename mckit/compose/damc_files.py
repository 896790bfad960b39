"""DAMC over real checkpoints: decoupled sources' text LoRAs merged into the language model, their modality
LoRAs kept apart and routed per position (METHODS.md 3; the toy models' version is :mod:`mckit.compose.damc`).

A decoupled source is a real MLLM folder whose language model is the base's (decoupled training leaves W0
frozen) with two ``peft`` LoRA adapters in ``adapters/``: ``adapters/text/`` and ``adapters/{modality}/``
(``adapter_config.json`` + ``adapter_model.safetensors``, what ``PeftModel.save_pretrained(DIR/adapters)``
writes for adapters named ``text`` and, e.g., ``image``). With dW = s B A (A (r, in), B (out, r), s = alpha / r,
or alpha / sqrt(r) with rsLoRA) on every adapted linear W0 of the seven per layer::

    W_text = W0 + sum_i lambda_i dW_i_text        (text and generated positions; lambda_i default 1/N)
    W_m    = W0 + dW_m                            (positions of modality m's inputs)

Written: ``llm/``: every base tensor, the adapted ones replaced by W_text in the base's dtype (plain
``AutoModelForCausalLM`` opens it: the text route alone), one tensor in memory at a time; ``damc.safetensors``:
``text.A.{name}`` (sum_i r_i, in) and ``text.B.{name}`` (out, sum_i r_i), the text deltas' factors side by side
with lambda_i s_i folded into B, and ``{modality}.A.{name}`` / ``{modality}.B.{name}`` with s folded into B.
:func:`route_damc` gives a loaded model the routes: a position of modality m adds x (dW_m - sum_i lambda_i
dW_i_text)^T, two low-rank products, so W_text + that = W_m.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from mckit.compose.damc import damc_coefficients
from mckit.merge.checks import MergeError, relative_distance
from mckit.merge.engine import write_shards
from mckit.models.decoupled import TEXT
from mckit.models.families import Family, llm_name
from mckit.models.routing import LINEARS, LowRankDelta, SumDelta, route_linears
from mckit.storage.tensorfiles import DTYPES, ShardWriter

DAMC_FILE = "damc.safetensors"
ADAPTERS = "adapters"
#: A source's language model may differ from the base's by rounding only (W0 is frozen in decoupled training).
SAME_W0 = 1e-2
_PEFT_NAME = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class Adapter:
    """One LoRA on disk: ``keys[causal-LM weight name] = (key of A (r, in), key of B (out, r))`` in ``file``, their
    shapes, and its scale s; the factors are read when asked for (one tensor's at a time)."""

    file: Path
    keys: dict[str, tuple[str, str]]
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]]
    scale: float

    @property
    def rank(self) -> int:
        return max(a[0] for a, _ in self.shapes.values())

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of weight ``name``, float32."""
        with safe_open(str(self.file), "pt") as f:
            return tuple(f.get_tensor(k).float() for k in self.keys[name])


def damc_options(options: dict, n: int) -> dict:
    """DAMC's options from a compose call: ``lam``, the text deltas' coefficients (one value or one per source,
    >= 0; default 1/N); anything else is an error naming it."""
    unknown = sorted(set(options) - {"lam", "scope", "seed"})
    if unknown:
        raise MergeError(f"option(s) {', '.join(unknown)} do not apply to damc; it accepts: lam")
    try:
        return {"lam": damc_coefficients(options.get("lam"), n, "lam", 1.0 / n)}
    except ValueError as err:
        raise MergeError(str(err)) from None


def read_adapter(folder: Path, family: Family) -> Adapter:
    """The LoRA in peft adapter ``folder`` under the causal-LM names of ``family``'s language model (its header
    only); an adapter that is not a plain LoRA on the seven linears of the language model is an error naming the
    file and tensor."""
    config_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise MergeError(f"{f} is missing: a decoupled source carries peft adapters {ADAPTERS}/{TEXT}/ and "
                             f"{ADAPTERS}/MODALITY/")
    config = json.loads(config_file.read_text())
    if config.get("peft_type") != "LORA" or config.get("rank_pattern") or config.get("alpha_pattern"):
        raise MergeError(f"{config_file}: only plain LoRA adapters (one rank and alpha, peft_type LORA) are read")
    rank, alpha = int(config["r"]), float(config["lora_alpha"])
    scale = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    parts: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            match = _PEFT_NAME.match(key)
            name = llm_name(family, match["module"] + ".weight") if match else None
            if name is None or name.split(".")[-2] not in LINEARS:
                raise MergeError(f"{weights}: tensor {key} adapts no linear of the language model "
                                 f"({', '.join(LINEARS)})")
            parts.setdefault(name, {})[match["factor"]] = (key, tuple(f.get_slice(key).get_shape()))
    if not parts:
        raise MergeError(f"{weights} holds no LoRA tensor")
    for name, ab in parts.items():
        if set(ab) != {"A", "B"} or len(ab["A"][1]) != 2 or ab["B"][1] != (ab["B"][1][0], ab["A"][1][0]):
            raise MergeError(f"{weights}: {name} needs lora_A (r, in) and lora_B (out, r); got "
                             f"{ {k: v[1] for k, v in ab.items()} }")
    return Adapter(weights, {n: (ab["A"][0], ab["B"][0]) for n, ab in parts.items()},
                   {n: (ab["A"][1], ab["B"][1]) for n, ab in parts.items()}, scale)


def check_adapters(base, adapters: list[Adapter]) -> None:
    """Every adapted weight is a base tensor of the product's shape (names the adapter and tensor)."""
    for adapter in adapters:
        for name, (a, b) in adapter.shapes.items():
            if name not in base.names or tuple(base.shape(name)) != (b[0], a[1]):
                shape = tuple(base.shape(name)) if name in base.names else "no such tensor"
                raise MergeError(f"{adapter.file}: {name} adapts ({b[0]}, {a[1]}) but the base has {shape}")


def check_frozen_w0(base, view, name: str, label: str) -> None:
    """A decoupled source's language model is the base's (up to rounding): checked on tensor ``name``."""
    distance = relative_distance(base, view, name)
    if not distance < SAME_W0:
        raise MergeError(f"{label}: its language model is not the base's ({name} at relative distance "
                         f"{distance:.3g}); DAMC's sources keep W0 frozen and carry their changes as LoRAs")


def side_by_side(terms: list[tuple[Adapter, float]], name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """sum_k c_k s_k B_k A_k as one product: (cat_k A_k, cat_k c_k s_k B_k); None where no term adapts ``name``."""
    pairs = [(ad.factors(name), c * ad.scale) for ad, c in terms if name in ad.keys]
    if not pairs:
        return None
    return torch.cat([a for (a, _), _ in pairs]), torch.cat([c * b for (_, b), c in pairs], dim=1)


def _factor_entries(texts: list[Adapter], modal: dict[str, Adapter]) -> list[tuple[str, tuple[int, ...], str]]:
    """The factor file's tensors (float32): the text factors side by side, then each modality's."""
    entries = []
    for name in sorted({n for ad in texts for n in ad.keys}):
        shapes = [ad.shapes[name] for ad in texts if name in ad.keys]
        rank = sum(a[0] for a, _ in shapes)
        entries += [(f"{TEXT}.A.{name}", (rank, shapes[0][0][1]), "F32"),
                    (f"{TEXT}.B.{name}", (shapes[0][1][0], rank), "F32")]
    for mod, ad in modal.items():
        for name, (a, b) in sorted(ad.shapes.items()):
            entries += [(f"{mod}.A.{name}", a, "F32"), (f"{mod}.B.{name}", b, "F32")]
    return entries


@dataclass
class _DAMCRun:
    """The text route's language model written tensor by tensor (W_text = W0 + B_text A_text), the factors
    beside it."""

    base: object
    texts: list[Adapter]
    lams: list[float]
    modal: dict[str, Adapter]
    factors: ShardWriter
    method: str = "damc"
    reader: object = None

    def input_files(self) -> list[Path]:
        return []

    def write_tensor(self, writer: ShardWriter, name: str, code: str) -> None:
        theta = self.base.array(name)
        text = side_by_side(list(zip(self.texts, self.lams)), name)
        if text is not None:
            a, b = text
            self.factors.write(f"{TEXT}.A.{name}", a.numpy())
            self.factors.write(f"{TEXT}.B.{name}", b.numpy())
            out = torch.from_numpy(np.asarray(theta, np.float32)) + b @ a
            if not torch.isfinite(out).all():
                raise MergeError(f"tensor {name}: W0 + the text deltas holds NaN or Inf (check the adapters)")
            theta = out.numpy().astype(DTYPES[code], copy=False)
        writer.write(name, theta)
        for mod, adapter in self.modal.items():
            if name in adapter.keys:
                a, b = side_by_side([(adapter, 1.0)], name)
                self.factors.write(f"{mod}.A.{name}", a.numpy())
                self.factors.write(f"{mod}.B.{name}", b.numpy())


def write_damc(base, texts: list[Adapter], modal: dict[str, Adapter], folder: Path, damc_file: Path,
               options: dict, progress: bool = True) -> dict:
    """Write ``folder`` (W_text) and ``damc_file`` (the factors) from the base's renamed view, each source's text
    adapter and ``{modality: adapter}``, one tensor in memory at a time; returns the manifest's ``damc`` entry."""
    check_adapters(base, [*texts, *modal.values()])
    folder.mkdir(parents=True)
    factors = ShardWriter(damc_file, _factor_entries(texts, modal))
    try:
        write_shards(_DAMCRun(base, texts, options["lam"], modal, factors), folder, 2 * 1024**3, progress)
    finally:
        factors.close(check=False)
    factors.close()
    return {"file": damc_file.name, "modalities": list(modal), "lam": options["lam"],
            "rank": {TEXT: [t.rank for t in texts], **{m: ad.rank for m, ad in modal.items()}}}


def route_damc(model, damc_file: Path, modalities: list[str]) -> None:
    """Give a composed model (its LLM holding W_text) DAMC's routes, in place: modality m's positions add
    x (s B_m A_m)^T - x (B_text A_text)^T in every linear its LoRA adapts (the text product shared by the routes)."""
    device = next(model.llm.parameters()).device
    dtype = next(model.llm.parameters()).dtype
    per_route: dict[int, dict] = {}
    with safe_open(str(damc_file), "pt", device=str(device)) as f:
        keys = set(f.keys())

        def adapted(prefix: str) -> set[str]:
            return {k[len(f"{prefix}.A."):] for k in keys if k.startswith(f"{prefix}.A.")}

        def delta(prefix: str, name: str, scale: float) -> LowRankDelta:
            return LowRankDelta(f.get_tensor(f"{prefix}.A.{name}").to(dtype),
                                f.get_tensor(f"{prefix}.B.{name}").to(dtype), scale)

        texts = {n: delta(TEXT, n, -1.0) for n in adapted(TEXT)}
        for mod in modalities:
            own = adapted(mod)
            for name in sorted(own | set(texts)):
                terms = ([delta(mod, name, 1.0)] if name in own else []) + ([texts[name]] if name in texts else [])
                per_route.setdefault(model.route_ids[mod], {})[name.removesuffix(".weight")] = SumDelta(terms)
    route_linears(model.llm, per_route, model.route_state)
