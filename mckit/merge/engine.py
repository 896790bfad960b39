"""Streaming merge engine over safetensors checkpoints.

A checkpoint is a directory with ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus ``config.json``).  The engine merges
one tensor name at a time across the base and every expert
(:mod:`mckit.storage.tensorfiles`) and writes the result straight into its place in
the output shard, so peak memory stays near one tensor per input plus the
merge's temporaries, never whole models.

* Tensors whose names match ``include`` (default :data:`DEFAULT_INCLUDE`: the
  language model's seven linears per decoder layer, never a vision or audio
  tower's) are merged; all others are copied from the base.  Options and their
  defaults come from :mod:`mckit.merge.registry`.  Merging runs in float32; each output tensor keeps the base's dtype.
* Average and task arithmetic never import torch.  Each tensor is cut into
  blocks of :data:`BLOCK` entries; worker threads read a block of every input
  with ``os.preadv`` into small reused buffers (they stay in the CPU cache),
  combine them with numpy (:mod:`mckit.merge.linear_kernel`) and ``os.pwrite`` the block
  into the output: a few MiB per thread, and about the time it takes to read
  the inputs once.
* TIES runs the same way (:mod:`mckit.merge.ties_kernel`, no torch): each
  expert's per-tensor trim threshold comes from one streamed counting pass
  inside a bracket placed by a sample (exact), then a second pass merges block
  by block.  With ``scope="global"`` two passes over each expert's whole task
  vector find the exact global threshold first (a 2^15 + 2^16 bin bit-pattern
  histogram, :func:`mckit.merge.thresholds.streamed_magnitude_threshold`;
  identical to ``kthvalue`` on the concatenated task vector; torch).
* Every other method memory-maps the tensor of each input and runs
  :func:`mckit.merge.kernels.merge_tensor` on it (torch is imported on first use).
* DARE masks are seeded per tensor: :func:`mckit.merge.registry.tensor_seed` (+ expert index),
  exactly as in memory (composition, :func:`merge_state_dict`).
* The output (shards, index json, config/tokenizer/generation files copied
  from the base) is written into a temporary directory next to ``out`` and
  renamed into place at the end: a failed or interrupted merge leaves nothing
  at ``out``.  All input checks (paths, names, shapes, vocab sizes, options)
  run before anything is written; NaN/Inf are detected while streaming.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

from mckit.merge.checks import MergeError, check_distinct, merged_names, open_checkpoint, prepare_out, validate_inputs
from mckit.merge.linear_kernel import (
    BLOCK,
    all_finite,
    as_float32,
    linear_block,
    linear_merge,
    parallel_blocks,
    read_float32,
    scratch,
)
from mckit.merge.registry import METHODS, get
from mckit.merge.ties_kernel import streamed_ties
from mckit.storage.atomic import atomic_dir
from mckit.storage.tensorfiles import (
    DTYPES,
    FLOAT_CODES,
    INDEX_FILE,
    SINGLE_FILE,
    BlockReader,
    Checkpoint,
    RenamedView,
    ShardWriter,
    plan_shards,
)

#: The language model's seven linears of every decoder layer, and nothing under a vision or audio tower, an
#: encoder or a projector: LLaVA's CLIP, Qwen2-VL's vision blocks and Whisper-style audio towers use the same
#: q/k/v/o and gate/up/down names, and are copied from the base, never merged.
DEFAULT_INCLUDE = (r"(?!.*(?:vision|visual|audio|speech|image|video|encoder|tower|projector))"
                   r".*\blayers\.\d+\.(?:self_attn|mlp)\.(?:q|k|v|o|gate|up|down)_proj\.weight")
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 1024**3

__all__ = ["DEFAULT_INCLUDE", "INDEX_FILE", "SINGLE_FILE", "MergeError", "merge_checkpoints",
           "merge_state_dict", "merge_array", "linear_merge"]


class NonFiniteResult(ValueError):
    """A merged tensor holds a NaN or an Inf."""


# ------------------------------------------------------------- per tensor
def merge_array(method: str, name: str, base: np.ndarray, experts: list[np.ndarray], options: dict,
                thresholds: Sequence[float] | None = None) -> np.ndarray:
    """Merge one in-memory tensor with ``method`` (``options`` resolved by the registry); returns float32.

    Average and task arithmetic run the numpy kernel; every other method
    :func:`mckit.merge.kernels.merge_tensor` (torch, imported on first use).
    Raises ``ValueError`` if an input holds a NaN/Inf (not checked by the
    linear kernel), :class:`NonFiniteResult` if the result does.
    """
    if get(method).linear_kernel:
        result, finite = linear_merge(method, base, experts, float(options.get("lam", 1.0)))
        if not finite:
            raise NonFiniteResult(f"merging tensor {name} produced NaN or Inf")
        return result
    import torch

    from mckit.merge.kernels import merge_tensor
    from mckit.merge.methods import all_finite as finite_tensor

    tensors = [torch.from_numpy(as_float32(a)) for a in (base, *experts)]
    result = merge_tensor(method, name, tensors[0], tensors[1:], options, thresholds)
    if not finite_tensor(result):
        raise NonFiniteResult(f"merging tensor {name} produced NaN or Inf")
    return result.numpy()


def _name_non_finite_input(name: str, checkpoints: list[Checkpoint]) -> None:
    """Raise ``MergeError`` naming the first input file whose tensor ``name`` holds a NaN/Inf."""
    for ck in checkpoints:
        if not all_finite(ck.array(name)):
            raise MergeError(f"tensor {name} in {ck.file_of(name)} contains NaN or Inf")


# ------------------------------------------------------------- validation
def _resolve_options(method: str, options: dict, scope: str, seed: int) -> dict:
    """The method's options with the registry's defaults (the seed folded in for seeded methods), all checked."""
    try:
        spec = get(method)
        resolved = spec.resolve(options)
    except ValueError as err:
        raise MergeError(str(err)) from None
    if spec.seeded:
        resolved["seed"] = int(seed)
    if scope not in ("tensor", "global"):
        raise MergeError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if scope == "global" and not spec.global_scope:
        valid = ", ".join(m.name for m in METHODS.values() if m.global_scope)
        raise MergeError(f"scope='global' applies to {valid}, not {method}")
    return resolved


# ------------------------------------------------------------- global TIES
def _global_thresholds(method: str, base: Checkpoint, experts: list[Checkpoint], merged: list[str],
                       options: dict) -> list[float]:
    """Per-expert exact global magnitude threshold over all merged tensors (two streamed passes)."""
    import torch

    from mckit.merge.kernels import global_thresholds

    return global_thresholds(method, merged, lambda n: torch.from_numpy(as_float32(base.array(n))),
                             lambda i, n: torch.from_numpy(as_float32(experts[i].array(n))), len(experts), options)


# --------------------------------------------------------------- the merge
def merge_checkpoints(method: str, base: str | Path, experts: Sequence[str | Path], out: str | Path, *,
                      include: str = DEFAULT_INCLUDE, scope: str = "tensor", seed: int = 0,
                      overwrite: bool = False, allow_vocab_mismatch: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                      **options) -> Path:
    """Merge safetensors checkpoints tensor by tensor and write the result to ``out``.

    ``method``: a name of :data:`mckit.merge.registry.METHODS`; ``options``: its keyword
    arguments (``lam``, ``keep``, ``drop``, ``by``, ``rank_ratio``, ``lr``, ``steps`` ...).
    ``include``: regex (``re.fullmatch``) on tensor names selecting what is merged;
    ``".*"`` merges everything.  ``scope``: "tensor" or "global" top-k for TIES.
    Returns ``out``.  Raises :class:`MergeError` (a ``ValueError``) on bad input.
    """
    out = Path(out)
    if not experts:
        raise MergeError("no expert checkpoints given")
    prepare_out(out, overwrite, [Path(base), *map(Path, experts)])
    check_distinct(Path(base), [Path(e) for e in experts])
    return merge_views(method, open_checkpoint(base), [open_checkpoint(e) for e in experts], out, include=include,
                       scope=scope, seed=seed, overwrite=overwrite, allow_vocab_mismatch=allow_vocab_mismatch,
                       max_shard_bytes=max_shard_bytes, progress=progress, **options)


def merge_views(method: str, base: Checkpoint | RenamedView, experts: Sequence[Checkpoint | RenamedView],
                out: Path, *, include: str = DEFAULT_INCLUDE, scope: str = "tensor", seed: int = 0,
                overwrite: bool = False, allow_vocab_mismatch: bool = False,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, side_files: bool = True,
                **options) -> Path:
    """:func:`merge_checkpoints` over opened checkpoints or renamed views of them (the output's tensors take the
    view's names); the output path is the caller's to check. ``side_files``: copy config and tokenizer files
    from the base's folder."""
    options = _resolve_options(method, options, scope, seed)
    merged = merged_names(base.names, include)
    validate_inputs(base, list(experts), merged, allow_vocab_mismatch)
    thresholds = _global_thresholds(method, base, list(experts), merged, options) if scope == "global" else None
    run = _MergeRun(method, base, list(experts), set(merged), options, thresholds)
    with atomic_dir(Path(out), overwrite=overwrite) as tmp:
        write_shards(run, tmp, max_shard_bytes, progress)
        if side_files:
            _copy_side_files(base.path, tmp)
    return Path(out)


def write_shards(run, tmp: Path, max_shard_bytes: int, progress: bool) -> None:
    """Write every tensor of ``run.base``, merged or copied by ``run.write_tensor(writer, name, dtype code)``, into
    shards (+ index) under ``tmp``, with ``run.reader`` open on ``run.input_files()`` meanwhile."""
    base = run.base
    entries = [(n, base.shape(n), base.dtype_code(n)) for n in base.names]
    shards = plan_shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = _progress_bar(len(entries), run.method, progress)
    weight_map = {}
    with BlockReader(run.input_files()) as run.reader:
        for file_name, shard in zip(names, shards):
            writer = ShardWriter(tmp / file_name, shard)
            try:
                for name, _, code in shard:
                    run.write_tensor(writer, name, code)
                    weight_map[name] = file_name
                    if bar is not None:
                        bar.update()
            finally:
                writer.close(check=False)
            writer.close()
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        total = sum(base.info(n).nbytes for n in base.names)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _progress_bar(total: int, method: str, progress: bool):
    """A tqdm bar over tensors, or None (tqdm is imported only when shown: it costs 50 ms of start-up)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"merge {method}", unit="tensor")


@dataclass
class _MergeRun:
    """One merge in progress: its inputs and settings, and how each output tensor is made."""

    method: str
    base: Checkpoint | RenamedView
    experts: list[Checkpoint | RenamedView]
    merged: set[str]
    options: dict
    thresholds: list[float] | None
    reader: BlockReader | None = None

    def linear_inputs(self) -> list[Checkpoint]:
        """Checkpoints the linear kernel reads: the average never reads the base."""
        return self.experts if self.method == "average" else [self.base, *self.experts]

    def input_files(self) -> list[Path]:
        """Files the linear kernel reads (none for the other methods)."""
        if not self.streamed:
            return []
        return [ck.file_of(n) for ck in self.linear_inputs() for n in self.merged]

    @property
    def streamed(self) -> bool:
        """Whether the method runs block by block in numpy (average, task arithmetic, TIES)."""
        return get(self.method).linear_kernel or self.method == "ties"

    def write_tensor(self, writer: ShardWriter, name: str, code: str) -> None:
        """Merge tensor ``name`` (or copy the base's after a NaN/Inf check) into ``writer``."""
        if name not in self.merged:
            array = self.base.array(name)
            if code in FLOAT_CODES and not all_finite(array):
                raise MergeError(f"tensor {name} in {self.base.file_of(name)} contains NaN or Inf")
            writer.write(name, array)
        elif get(self.method).linear_kernel:
            size = self.base.info(name).numel
            if not parallel_blocks(lambda starts: self._linear_blocks(writer, name, starts), size):
                self._fail(name, NonFiniteResult(f"merging tensor {name} produced NaN or Inf"))
        elif self.method == "ties":
            if not streamed_ties(self.reader, self.base, self.experts, name, self.options, writer, self.thresholds):
                self._fail(name, NonFiniteResult(f"merging tensor {name} produced NaN or Inf"))
        else:
            writer.write(name, self._torch_merge(name))

    def _linear_blocks(self, writer: ShardWriter, name: str, starts) -> bool:
        """Read, merge and write the blocks ``starts`` of tensor ``name``; returns whether all are finite."""
        inputs = self.linear_inputs()
        size, code = self.base.info(name).numel, writer.slots[name].code
        lam, finite = float(self.options.get("lam", 1.0)), True
        for start in starts:
            count = min(BLOCK, size - start)
            arrays = [read_float32(self.reader, ck.info(name), start, count, i) for i, ck in enumerate(inputs)]
            theta_0, thetas = (None, arrays) if self.method == "average" else (arrays[0], arrays[1:])
            out = scratch(len(inputs))[1][:count]
            finite = linear_block(self.method, theta_0, thetas, lam, out) and finite
            writer.write_entries(name, start, out if code == "F32" else out.astype(DTYPES[code]))
        return finite

    def _torch_merge(self, name: str) -> np.ndarray:
        theta_0 = self.base.array(name)
        try:
            result = merge_array(self.method, name, theta_0, [e.array(name) for e in self.experts],
                                 self.options, self.thresholds)
        except ValueError as err:
            self._fail(name, err)
        return result.astype(theta_0.dtype, copy=False)

    def _fail(self, name: str, err: ValueError) -> NoReturn:
        """Raise ``MergeError`` naming the input file with a NaN/Inf in ``name``, else re-raise ``err``."""
        _name_non_finite_input(name, [self.base, *self.experts])
        if isinstance(err, NonFiniteResult):
            raise MergeError(f"{err} (inputs are finite)") from None
        raise err


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------- in memory
def merge_state_dict(method: str, base: dict, experts: Sequence[dict], *, include: str = DEFAULT_INCLUDE,
                     scope: str = "tensor", seed: int = 0, **options) -> dict:
    """In-memory counterpart of :func:`merge_checkpoints` for small models (same per-tensor maths and seeds).

    ``base``/``experts``: name -> torch tensor.  Returns a new state dict:
    tensors matching ``include`` merged (in the base's dtype), all others
    the base's tensors.  Inputs are not modified.
    """
    import torch

    from mckit.merge.kernels import global_thresholds
    from mckit.merge.methods import check_finite

    options = _resolve_options(method, options, scope, seed)
    merged = merged_names(list(base), include)
    for name in merged:
        for i, e in enumerate(experts):
            if name not in e:
                raise MergeError(f"tensor {name} is missing in expert {i}")
            if e[name].shape != base[name].shape:
                raise MergeError(f"tensor {name} has shape {tuple(e[name].shape)} in expert {i} "
                                 f"but {tuple(base[name].shape)} in the base")
    thresholds = (global_thresholds(method, merged, base.__getitem__, lambda i, n: experts[i][n], len(experts),
                                    options) if scope == "global" else None)
    result = {}
    for name, theta_0 in base.items():
        if name not in merged:
            result[name] = theta_0.clone()
            continue
        tensors = [theta_0] + [e[name] for e in experts]
        for t, label in zip(tensors, ["base"] + [f"expert {i}" for i in range(len(experts))]):
            check_finite(t, f"{name} in {label}")
        arrays = [t.detach().float().numpy() for t in tensors]
        merged_array = merge_array(method, name, arrays[0], arrays[1:], options, thresholds)
        result[name] = torch.from_numpy(merged_array).to(theta_0.dtype)
    return result

