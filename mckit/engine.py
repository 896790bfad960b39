"""Streaming merge engine over safetensors checkpoints.

A checkpoint is a directory with ``model.safetensors`` or a sharded
``model.safetensors.index.json`` (plus ``config.json``).  The engine reads one
tensor name at a time from the base and every expert with
``safetensors.safe_open``, merges it with a function of :mod:`mckit.merging`
and streams the result straight into the output shard, so peak memory is
about one tensor per input plus the merge's temporaries, never whole models.

* Tensors whose names match ``include`` (default: the LLM's 2-D linear
  weights, :data:`DEFAULT_INCLUDE`) are merged; all others are copied from
  the base.  Merging runs in float32; each output tensor keeps the base's dtype.
* TIES with ``scope="global"`` streams too: for each expert, two passes over
  its task vector find the exact global magnitude threshold (a 2^15 + 2^16 bin
  bit-pattern histogram, :func:`mckit.merging.streamed_magnitude_threshold`;
  identical to ``kthvalue`` on the concatenated task vector), then a third pass merges.
* DARE masks are seeded per tensor: ``tensor_seed(seed, name)`` (+ expert index).
* The output (shards, index json, config/tokenizer/generation files copied
  from the base) is written into a temporary directory next to ``out`` and
  renamed into place at the end: a failed or interrupted merge leaves nothing
  at ``out``.  All input checks (paths, names, shapes, vocab sizes, options)
  run before anything is written; NaN/Inf are detected while streaming.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
import shutil
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor
from tqdm.auto import tqdm

from mckit import merging as M
from mckit.atomic import atomic_dir

DEFAULT_INCLUDE = r".*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt",
                "added_tokens.json", "chat_template.jinja")
DEFAULT_SHARD_BYTES = 2 * 1024**3
GLOBAL_SCOPE_METHODS = ("ties", "dare_ties")

# safetensors dtype codes (https://huggingface.co/docs/safetensors, "Format")
_DTYPE_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                torch.uint8: "U8", torch.bool: "BOOL"}
_CODE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1}


class MergeError(ValueError):
    """Bad merge input (paths, tensor names, shapes, values or options)."""


# ------------------------------------------------------------------ reading
class Checkpoint:
    """Read-only view of a safetensors checkpoint directory, tensor by tensor.

    ``names`` keeps the file order; ``shape(name)``/``dtype_code(name)`` come
    from the headers read once at construction.  ``get(name)`` opens the file
    for that one read: safetensors returns a zero-copy view of a private
    memory map, and a long-lived handle would keep every page it touched
    resident (RSS growing to the whole model); a per-read handle lets the
    mapping go as soon as the caller drops the tensor.  The returned tensor
    must not be modified in place (copy-on-write pages would be allocated).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MergeError(f"checkpoint directory not found: {self.path}")
        self.files = self._weight_map()
        self.names, self._meta = [], {}
        for f in dict.fromkeys(self.files.values()):
            with safe_open(self.path / f, framework="pt") as handle:
                for name in handle.keys():
                    if self.files.get(name) == f:
                        view = handle.get_slice(name)
                        self.names.append(name)
                        self._meta[name] = (tuple(view.get_shape()), view.get_dtype())

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            for f in set(weight_map.values()):
                if not (self.path / f).is_file():
                    raise MergeError(f"shard {f} listed in {index} is missing")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise MergeError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        with safe_open(single, framework="pt") as handle:
            return {name: SINGLE_FILE for name in handle.keys()}

    def file_of(self, name: str) -> Path:
        return self.path / self.files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][0]

    def dtype_code(self, name: str) -> str:
        return self._meta[name][1]

    def get(self, name: str) -> Tensor:
        with safe_open(self.file_of(name), framework="pt") as handle:
            return handle.get_tensor(name)

    def config(self) -> dict:
        path = self.path / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def close(self) -> None:
        """Nothing stays open between reads; kept for use as a context manager."""

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ writing
def _plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list]:
    """Split ``(name, shape, dtype_code)`` entries, in order, into shards of at most ``max_shard_bytes``."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = _CODE_BYTES[entry[2]] * _numel(entry[1])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class ShardWriter:
    """Streams tensors into one ``.safetensors`` file whose layout is known up front.

    safetensors format: 8-byte little-endian header length, a JSON header
    ``{name: {dtype, shape, data_offsets}}`` padded with spaces to a multiple
    of 8, then the raw little-endian tensor bytes in header order.  Because
    every output shape and dtype is known before merging, the header is
    written first and each merged tensor is appended as soon as it exists.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], str]]):
        header, offset = {}, 0
        for name, shape, code in entries:
            nbytes = _CODE_BYTES[code] * _numel(shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self.expected = [(name, shape, code) for name, shape, code in entries]
        self.total_bytes = offset
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(blob)) + blob)
        self.position = 0

    def write(self, name: str, tensor: Tensor) -> None:
        exp_name, exp_shape, exp_code = self.expected[self.position]
        if name != exp_name or tuple(tensor.shape) != exp_shape or _DTYPE_CODES[tensor.dtype] != exp_code:
            raise RuntimeError(f"out-of-plan tensor {name}: expected {exp_name} {exp_shape} {exp_code}")
        self.file.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)
        self.position += 1

    def close(self) -> None:
        if self.position != len(self.expected):
            raise RuntimeError("shard closed before all its tensors were written")
        self.file.close()


# ------------------------------------------------------------- per tensor
def tensor_seed(seed: int, name: str) -> int:
    """Seed of a tensor's DARE masks: stable across runs and processes (CRC32 of the name)."""
    return (int(seed) * 1_000_003 + zlib.crc32(name.encode())) % (2**62)


def _sum(tensors: list[Tensor]) -> Tensor:
    """sum_i tensors_i in float32: one new buffer, then in-place accumulation (inputs untouched)."""
    total = torch.add(tensors[0].float(), tensors[1]) if len(tensors) > 1 else tensors[0].float().clone()
    for t in tensors[2:]:
        total.add_(t)
    return total


def _fast_linear(method: str, base: Tensor, experts: list[Tensor], lam: float) -> Tensor:
    """Average / task arithmetic on owned tensors without copies (same formulas as mckit.merging).

    average:          sum_i theta_i / n
    task arithmetic:  theta_0 + lam * (sum_i theta_i - n theta_0)
    """
    total = _sum(experts)
    if method == "average":
        return total.div_(len(experts))
    base = base.float()
    return total.sub_(base, alpha=len(experts)).mul_(lam).add_(base)


def merge_tensor(method: str, name: str, base: Tensor, experts: list[Tensor], options: dict,
                 seed: int = 0, thresholds: Sequence[float] | None = None) -> Tensor:
    """Merge one tensor with ``method``; returns float32.  DARE seeds come from ``tensor_seed``."""
    if method in ("average", "task_arithmetic"):
        return _fast_linear(method, base, experts, float(options.get("lam", 1.0)))
    kwargs = dict(options)
    if method in ("dare_ta", "dare_ties"):
        kwargs["seed"] = tensor_seed(seed, name)
    if thresholds is not None:
        kwargs["thresholds"] = thresholds
    return M.get_method(method)(base, experts, **kwargs)


def _check_finite(name: str, result: Tensor, checkpoints: list[Checkpoint]) -> None:
    """Cheap check on the merged result; on failure, re-read the inputs to name the culprit.

    For average and task arithmetic a NaN/Inf in any input always reaches the
    result, so checking the result alone replaces n + 1 input checks.
    """
    if M.all_finite(result):
        return
    _name_non_finite_input(name, checkpoints)
    raise MergeError(f"merging tensor {name} produced NaN or Inf (inputs are finite)")


def _name_non_finite_input(name: str, checkpoints: list[Checkpoint]) -> None:
    """Raise ``MergeError`` naming the first input file whose tensor ``name`` holds a NaN/Inf."""
    for ck in checkpoints:
        if not M.all_finite(ck.get(name)):
            raise MergeError(f"tensor {name} in {ck.file_of(name)} contains NaN or Inf")


# ------------------------------------------------------------- validation
def _validate_options(method: str, options: dict, scope: str) -> None:
    fn = M.get_method(method)
    accepted = set(inspect.signature(fn).parameters) - {"theta_0", "thetas", "losses", "thresholds", "seed"}
    unknown = set(options) - accepted
    if unknown:
        raise MergeError(f"option(s) {', '.join(sorted(unknown))} do not apply to method {method}; "
                         f"it accepts: {', '.join(sorted(accepted)) or 'none'}")
    if "keep" in options:
        M.check_fraction("keep", options["keep"])
    if "drop" in options:
        M.check_fraction("drop", options["drop"], closed_low=True, closed_high=False)
    if "rank_ratio" in options and options["rank_ratio"] is not None:
        M.check_fraction("rank_ratio", options["rank_ratio"])
    if scope not in ("tensor", "global"):
        raise MergeError(f"scope must be 'tensor' or 'global', got {scope!r}")
    if scope == "global" and method not in GLOBAL_SCOPE_METHODS:
        raise MergeError(f"scope='global' applies to {', '.join(GLOBAL_SCOPE_METHODS)}, not {method}")


def _validate_inputs(base: Checkpoint, experts: list[Checkpoint], merged: list[str],
                     allow_vocab_mismatch: bool) -> None:
    if not allow_vocab_mismatch:
        vocab = base.config().get("vocab_size")
        for e in experts:
            other = e.config().get("vocab_size")
            if vocab is not None and other is not None and other != vocab:
                raise MergeError(f"different vocab sizes: base {base.path} has {vocab}, expert {e.path} "
                                 f"has {other} (align the vocabularies first, or pass "
                                 f"allow_vocab_mismatch=True to take unmerged tensors from the base)")
    for name in merged:
        for e in experts:
            if name not in e.files:
                raise MergeError(f"tensor {name} is missing in expert {e.path}")
            if e.shape(name) != base.shape(name):
                raise MergeError(f"tensor {name} has shape {e.shape(name)} in {e.file_of(name)} "
                                 f"but {base.shape(name)} in {base.file_of(name)}")


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise MergeError(f"output directory {out} exists (pass overwrite=True to replace it)")
    if not out.parent.is_dir():
        raise MergeError(f"parent directory of the output does not exist: {out.parent}")


# ------------------------------------------------------------- global TIES
def _global_thresholds(method: str, base: Checkpoint, experts: list[Checkpoint], merged: list[str],
                       options: dict, seed: int) -> list[float]:
    """Per-expert exact global magnitude threshold over all merged tensors (two streamed passes)."""
    keep = float(options.get("keep", 0.2 if method == "ties" else 1.0))
    drop = float(options.get("drop", 0.2))

    def stream(i: int):
        for name in merged:
            tau = experts[i].get(name).float() - base.get(name).float()
            if method == "dare_ties":
                generator = torch.Generator().manual_seed(tensor_seed(seed, name) + i)
                tau = M.dare_drop(tau, drop, generator)
            yield tau

    return [M.streamed_magnitude_threshold(lambda i=i: stream(i), keep) for i in range(len(experts))]


# --------------------------------------------------------------- the merge
def merge_checkpoints(method: str, base: str | Path, experts: Sequence[str | Path], out: str | Path, *,
                      include: str = DEFAULT_INCLUDE, scope: str = "tensor", seed: int = 0,
                      overwrite: bool = False, allow_vocab_mismatch: bool = False,
                      max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True,
                      **options) -> Path:
    """Merge safetensors checkpoints tensor by tensor and write the result to ``out``.

    ``method``: a name of :data:`mckit.merging.METHODS`; ``options``: its keyword
    arguments (``lam``, ``keep``, ``drop``, ``by``, ``rank_ratio``, ``lr``, ``steps`` ...).
    ``include``: regex (``re.fullmatch``) on tensor names selecting what is merged;
    ``".*"`` merges everything.  ``scope``: "tensor" or "global" top-k for TIES.
    Returns ``out``.  Raises :class:`MergeError` (a ``ValueError``) on bad input.
    """
    M.get_method(method)
    _validate_options(method, options, scope)
    out = Path(out)
    _prepare_out(out, overwrite)
    if not experts:
        raise MergeError("no expert checkpoints given")
    pattern = re.compile(include)
    with contextlib.ExitStack() as stack:
        base_ck = stack.enter_context(Checkpoint(base))
        expert_cks = [stack.enter_context(Checkpoint(e)) for e in experts]
        merged = [n for n in base_ck.names if pattern.fullmatch(n)]
        _validate_inputs(base_ck, expert_cks, merged, allow_vocab_mismatch)
        thresholds = (_global_thresholds(method, base_ck, expert_cks, merged, options, seed)
                      if scope == "global" else None)
        with atomic_dir(out, overwrite=True) as tmp:
            _write_merge(method, base_ck, expert_cks, set(merged), tmp, options, seed, thresholds,
                         max_shard_bytes, progress)
            _copy_side_files(base_ck.path, tmp)
    return out


def _write_merge(method, base, experts, merged, tmp, options, seed, thresholds, max_shard_bytes, progress):
    entries = [(n, base.shape(n), base.dtype_code(n)) for n in base.names]
    shards = _plan_shards(entries, max_shard_bytes)
    names = [SINGLE_FILE] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    bar = tqdm(total=len(entries), desc=f"merge {method}", unit="tensor", disable=not progress)
    weight_map = {}
    for file_name, shard in zip(names, shards):
        writer = ShardWriter(tmp / file_name, shard)
        try:
            for name, _, _ in shard:
                theta_0 = base.get(name)
                if name in merged:
                    thetas = [e.get(name) for e in experts]
                    try:      # the merging functions reject NaN/Inf inputs; name the file here
                        result = merge_tensor(method, name, theta_0, thetas, options, seed, thresholds)
                    except ValueError:
                        _name_non_finite_input(name, [base, *experts])
                        raise
                    _check_finite(name, result, [base, *experts])
                    writer.write(name, result.to(theta_0.dtype))
                else:
                    if not M.all_finite(theta_0):
                        raise MergeError(f"tensor {name} in {base.file_of(name)} contains NaN or Inf")
                    writer.write(name, theta_0)
                weight_map[name] = file_name
                bar.update()
        finally:
            writer.file.close()
        writer.close()
    bar.close()
    if len(shards) > 1:
        total = sum(_CODE_BYTES[c] * _numel(s) for _, s, c in entries)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in COPIED_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


# --------------------------------------------------------- in memory
def merge_state_dict(method: str, base: dict[str, Tensor], experts: Sequence[dict[str, Tensor]], *,
                     include: str = DEFAULT_INCLUDE, scope: str = "tensor", seed: int = 0,
                     **options) -> dict[str, Tensor]:
    """In-memory counterpart of :func:`merge_checkpoints` for small models (same per-tensor maths).

    Returns a new state dict: tensors matching ``include`` merged (in the
    base's dtype), all others the base's tensors.  Inputs are not modified.
    """
    _validate_options(method, options, scope)
    pattern = re.compile(include)
    merged = [n for n in base if pattern.fullmatch(n)]
    for name in merged:
        for i, e in enumerate(experts):
            if name not in e:
                raise MergeError(f"tensor {name} is missing in expert {i}")
            if e[name].shape != base[name].shape:
                raise MergeError(f"tensor {name} has shape {tuple(e[name].shape)} in expert {i} "
                                 f"but {tuple(base[name].shape)} in the base")
    thresholds = None
    if scope == "global":
        keep = float(options.get("keep", 0.2 if method == "ties" else 1.0))
        if method == "dare_ties":
            drop = float(options.get("drop", 0.2))
            dropped = [{n: M.dare_drop(e[n].float() - base[n].float(), drop,
                                       torch.Generator().manual_seed(tensor_seed(seed, n) + i))
                        for n in merged} for i, e in enumerate(experts)]
            zero = {n: torch.zeros_like(base[n], dtype=torch.float32) for n in merged}
            thresholds = M.global_magnitude_thresholds(zero, dropped, keep, merged)
        else:
            thresholds = M.global_magnitude_thresholds(base, experts, keep, merged)
    result = {}
    for name, theta_0 in base.items():
        if name in merged:
            thetas = [e[name].clone() for e in experts]
            labels = ["base"] + [f"expert {i}" for i in range(len(experts))]
            M.check_finite(theta_0, f"{name} in base")
            for t, label in zip(thetas, labels[1:]):
                M.check_finite(t, f"{name} in {label}")
            result[name] = merge_tensor(method, name, theta_0, thetas, options, seed, thresholds).to(theta_0.dtype)
        else:
            result[name] = theta_0.clone()
    return result
