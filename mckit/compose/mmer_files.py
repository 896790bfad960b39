"""MMER over real checkpoints, streamed block by block: tau*, each modality's mask and the text route's weights.

For every merged tensor of the language model (its seven linears per layer), from the base's and the N
sources' shards (renamed views, no copies):

    tau_i  = theta_i - theta_0                                       (modality i's source)
    tau*   = TIES(tau_1 .. tau_N; keep K), lambda 1                  (:mod:`mckit.merge.ties_kernel`)
    m_i    = [sign(tau_i) == sign(tau*)] AND [|tau_i| >= lam_i * 0.5 * |tau*|]   (untrimmed tau_i, as
             :func:`mckit.compose.mmer.build_masks` by default)
    W_text = theta_0 + mean_i(m_i) * tau*                            (text and generated positions)

Written: ``llm/``: every base tensor, the merged ones replaced by W_text in the base's dtype (plain
``AutoModelForCausalLM`` opens it: the text route alone); ``mmer.safetensors``: ``tau_star.{name}``
(the base's dtype) and ``mask.{modality}.{name}`` (uint8, 8 entries per byte, numpy ``packbits``
big-endian, as :func:`mckit.compose.mmer.pack`). Memory: a few blocks per worker thread, whatever the
model's size. :func:`route_mmer` puts the routes on a loaded model: a position of modality i runs
W_text + (m_i - mean_j m_j) tau* = theta_0 + m_i tau*.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from mckit.compose.mmer import KEEP, check_keep, check_lams
from mckit.merge.checks import MergeError, merged_names, validate_inputs
from mckit.merge.engine import DEFAULT_INCLUDE, write_shards
from mckit.merge.linear_kernel import BLOCK, all_finite, parallel_blocks, read_float32, scratch
from mckit.merge.ties_kernel import SUB, TiesWork, sub_blocks, tensor_thresholds, ties_block
from mckit.models.routing import PackedMaskDelta, route_linears
from mckit.storage.tensorfiles import DTYPES, ShardWriter

MASK_FILE = "mmer.safetensors"


def mmer_options(options: dict, n: int) -> dict:
    """MMER's options from a compose call: ``keep`` (K, default 0.8) and ``lam`` (one value, or one per
    source); anything else is an error naming it."""
    unknown = sorted(set(options) - {"keep", "lam", "scope", "seed"})
    if unknown:
        raise MergeError(f"option(s) {', '.join(unknown)} do not apply to mmer; it accepts: keep, lam")
    if options.get("scope", "tensor") != "tensor":
        raise MergeError("mmer over checkpoints trims per tensor (scope 'tensor')")
    try:
        return {"keep": check_keep(options.get("keep", KEEP)), "lam": check_lams(options.get("lam", 1.0), n)}
    except ValueError as err:
        raise MergeError(str(err)) from None


@dataclass
class _MMERRun:
    """One streamed MMER: the inputs, the mask file being written, and how each output tensor is made."""

    base: object
    experts: list
    modalities: tuple[str, ...]
    merged: set[str]
    keep: float
    lams: list[float]
    masks: ShardWriter | None = None
    reader: object = None
    method: str = "mmer"
    density: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def input_files(self) -> list[Path]:
        return [ck.file_of(n) for ck in (self.base, *self.experts) for n in self.merged]

    def mask_entries(self) -> list[tuple[str, tuple[int, ...], str]]:
        """tau* and each modality's packed mask for every merged tensor, in the base's order."""
        out = []
        for name in (n for n in self.base.names if n in self.merged):
            info = self.base.info(name)
            out.append((f"tau_star.{name}", info.shape, info.code))
            out += [(f"mask.{m}.{name}", ((info.numel + 7) // 8,), "U8") for m in self.modalities]
        return out

    def write_tensor(self, writer: ShardWriter, name: str, code: str) -> None:
        if name not in self.merged:
            writer.write(name, self.base.array(name))
            return
        thresholds = tensor_thresholds(self.reader, self.base, self.experts, name, self.keep)
        numel = self.base.info(name).numel
        if not parallel_blocks(lambda starts: self._blocks(writer, name, starts, thresholds), numel):
            raise MergeError(f"tensor {name}: tau* or W_text holds NaN or Inf (check the inputs)")

    def _blocks(self, writer: ShardWriter, name: str, starts, thresholds) -> bool:
        infos = [ck.info(name) for ck in (self.base, *self.experts)]
        numel, code, n = infos[0].numel, infos[0].code, len(self.experts)
        work, finite = TiesWork(n, SUB), True
        text, tau_star = scratch(n + 1)[1], scratch(n + 2)[1]
        packed = {m: np.empty(BLOCK // 8, np.uint8) for m in self.modalities}
        for start in starts:
            size = min(BLOCK, numel - start)
            arrays = [read_float32(self.reader, info, start, size, i) for i, info in enumerate(infos)]
            for s, e in sub_blocks(size):
                finite = self._piece([a[s:e] for a in arrays], thresholds, text[s:e], tau_star[s:e],
                                     {m: p[s // 8:(e + 7) // 8] for m, p in packed.items()}, work.view(e - s)) \
                    and finite
            writer.write_entries(name, start, text[:size].astype(DTYPES[code], copy=False))
            self.masks.write_entries(f"tau_star.{name}", start, tau_star[:size].astype(DTYPES[code], copy=False))
            for mod, p in packed.items():
                self.masks.write_entries(f"mask.{mod}.{name}", start // 8, p[:(size + 7) // 8])
        return finite

    def _piece(self, arrays, thresholds, text, tau_star, packed, work) -> bool:
        """tau*, W_text and the packed masks of one piece of a block (``arrays``: theta_0, then each source)."""
        n = len(self.experts)
        ties_block(arrays[0], arrays[1:], thresholds, [1.0] * n, "count", 1.0, text, work)
        np.copyto(tau_star, work.numerator)
        mean = work.denominator
        mean.fill(0)
        for mod, theta, lam in zip(self.modalities, arrays[1:], self.lams):
            mask = self._mask(theta - arrays[0], tau_star, lam)
            with self.lock:
                self.density[mod] = self.density.get(mod, 0) + int(np.count_nonzero(mask))
            packed[mod][:] = np.packbits(mask)
            np.add(mean, mask, out=mean)
        np.divide(mean, np.float32(n), out=mean)                # mean_i m_i
        np.multiply(mean, tau_star, out=mean)
        np.add(mean, arrays[0], out=text)
        return all_finite(text) and all_finite(tau_star)

    @staticmethod
    def _mask(tau: np.ndarray, tau_star: np.ndarray, lam: float) -> np.ndarray:
        """m_i = [sign(tau_i) == sign(tau*)] AND [|tau_i| >= lam * 0.5 * |tau*|], one block."""
        mask = np.sign(tau) == np.sign(tau_star)
        mask &= np.abs(tau) >= np.float32(lam * 0.5) * np.abs(tau_star)
        return mask


def write_mmer(base, experts: list, modalities: tuple[str, ...], folder: Path, mask_file: Path, options: dict,
               progress: bool = True) -> dict:
    """Write ``folder`` (the text route's language model) and ``mask_file`` (tau* + packed masks) from renamed
    views of the base and of one source per modality; returns ``{"keep", "lam", "density": {modality: share}}``."""
    merged = merged_names(base.names, DEFAULT_INCLUDE)
    validate_inputs(base, experts, merged, False)
    run = _MMERRun(base, experts, modalities, set(merged), options["keep"], options["lam"])
    folder.mkdir(parents=True)
    run.masks = ShardWriter(mask_file, run.mask_entries())
    try:
        write_shards(run, folder, 2 * 1024**3, progress)
    finally:
        run.masks.close(check=False)
    run.masks.close()
    total = sum(base.info(n).numel for n in merged)
    return {**options, "density": {m: run.density.get(m, 0) / total for m in modalities}}


def route_mmer(model, mask_file: Path, modalities: list[str]) -> None:
    """Give a composed model (its LLM holding W_text) MMER's routes, in place: modality i's positions add
    x ((m_i - mean_j m_j) tau*)^T in every linear with a mask (:class:`~mckit.models.routing.PackedMaskDelta`)."""
    from safetensors import safe_open

    device = next(model.llm.parameters()).device
    per_route: dict[int, dict] = {}
    with safe_open(str(mask_file), "pt", device=str(device)) as f:
        names = [k[len("tau_star."):] for k in f.keys() if k.startswith("tau_star.")]
        for name in names:
            tau_star = f.get_tensor(f"tau_star.{name}")
            packed = torch.stack([f.get_tensor(f"mask.{m}.{name}") for m in modalities])
            for i, mod in enumerate(modalities):
                delta = PackedMaskDelta(tau_star, packed, i)
                per_route.setdefault(model.route_ids[mod], {})[name.removesuffix(".weight")] = delta
    route_linears(model.llm, per_route, model.route_state)
