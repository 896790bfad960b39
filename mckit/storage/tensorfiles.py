"""Safetensors checkpoints read and written tensor by tensor through numpy (no torch import).

Format (https://huggingface.co/docs/safetensors, "Format"): 8-byte
little-endian header length N, a JSON header ``{name: {dtype, shape,
data_offsets: [begin, end]}}`` (offsets relative to byte ``8 + N``), then
the raw little-endian tensor bytes.  Reading maps one tensor's bytes with
``numpy.memmap`` (zero-copy) or reads ranges of its entries with
``os.preadv``; writing places tensors, or ranges of their entries, into a
file whose header is known up front (``os.pwrite``).  ``bfloat16`` comes from ``ml_dtypes`` (numpy has
none).  The merge engine builds on this module so that linear merges never
import torch (its import alone takes longer than reading a 200M-parameter
model from page cache).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
CODES = {np.dtype(t): code for code, t in DTYPES.items()}
FLOAT_CODES = ("F64", "F32", "F16", "BF16")
MAX_HEADER_BYTES = 100 * 1024**2
_IO_CHUNK = 1 << 30          # bytes per read/write system call


class TensorFileError(ValueError):
    """A checkpoint file or directory that cannot be read as safetensors."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``file``, dtype ``code`` (e.g. "F32"), ``shape``, absolute byte ``offset``."""

    file: Path
    code: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * np.dtype(DTYPES[self.code]).itemsize


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> :class:`TensorInfo` for one ``.safetensors`` file, in file order; validated."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise TensorFileError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise TensorFileError(f"{path} has an unreadable safetensors header: {err}") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path} has an unreadable safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    start, infos = 8 + n, {}
    for name, meta in header.items():
        try:
            (begin, end), code, shape = meta["data_offsets"], meta["dtype"], tuple(int(d) for d in meta["shape"])
        except (KeyError, TypeError, ValueError) as err:
            raise TensorFileError(f"tensor {name} in {path} has a malformed header entry ({err!r})") from None
        if code not in DTYPES:
            raise TensorFileError(f"tensor {name} in {path} has unsupported dtype {code}")
        info = TensorInfo(path, code, shape, start + begin)
        if end - begin != info.nbytes or begin < 0 or start + end > size:
            raise TensorFileError(f"tensor {name} in {path}: data_offsets {begin}..{end} do not match "
                                  f"shape {info.shape} {info.code} or the file size")
        infos[name] = info
    _check_contiguous(path, infos, start, size)
    return dict(sorted(infos.items(), key=lambda kv: kv[1].offset))


def _check_contiguous(path: Path, infos: dict[str, TensorInfo], start: int, size: int) -> None:
    """The tensors' byte ranges must tile the data section exactly, as safetensors requires: no overlap, no gap."""
    end = start
    for name, info in sorted(infos.items(), key=lambda kv: (kv[1].offset, kv[1].nbytes)):
        if info.offset != end:
            kind = "overlaps the tensor before it" if info.offset < end else "leaves a gap before it"
            raise TensorFileError(f"tensor {name} in {path}: its data_offsets start at {info.offset - start}, "
                                  f"which {kind} (expected {end - start})")
        end = info.offset + info.nbytes
    if end != size:
        raise TensorFileError(f"{path}: the tensors' data ends at byte {end} but the file has {size} bytes")


def read_array(info: TensorInfo) -> np.ndarray:
    """The tensor's bytes as an array of its own dtype, memory-mapped copy-on-write.

    Writing to it never reaches the file; dropping every reference unmaps it,
    so pages read for one tensor do not stay resident.
    """
    dtype = DTYPES[info.code]
    if info.numel == 0:
        return np.zeros(info.shape, dtype)
    flat = np.memmap(info.file, dtype=dtype, mode="c", offset=info.offset, shape=(info.numel,))
    return flat.reshape(info.shape)


class Checkpoint:
    """Read-only view of a checkpoint directory (``model.safetensors`` or sharded with an index).

    ``names`` keeps file order (shards in order of first appearance in the
    index); ``info(name)`` gives dtype code, shape and location; ``array(name)``
    maps the tensor (see :func:`read_array`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise TensorFileError(f"checkpoint directory not found: {self.path}")
        self._infos: dict[str, TensorInfo] = {}
        files = self._weight_map()
        for f in dict.fromkeys(files.values()):
            for name, info in read_header(self.path / f).items():
                if files.get(name) == f:
                    self._infos[name] = info
        missing = sorted(set(files) - set(self._infos))
        if missing:
            raise TensorFileError(f"tensor {missing[0]} listed in {self.path / INDEX_FILE} "
                                  f"is not in {self.path / files[missing[0]]}")
        self.names = list(self._infos)

    def _weight_map(self) -> dict[str, str]:
        index = self.path / INDEX_FILE
        if index.is_file():
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise TensorFileError(f"{index} has no weight_map object (tensor name -> shard file)")
            for f in set(weight_map.values()):
                if not (self.path / f).is_file():
                    raise TensorFileError(f"shard {f} listed in {index} is missing")
            return dict(weight_map)
        single = self.path / SINGLE_FILE
        if not single.is_file():
            raise TensorFileError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}")
        return {name: SINGLE_FILE for name in read_header(single)}

    def __contains__(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        return self._infos[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._infos[name].shape

    def dtype_code(self, name: str) -> str:
        return self._infos[name].code

    def file_of(self, name: str) -> Path:
        return self._infos[name].file

    def array(self, name: str) -> np.ndarray:
        return read_array(self._infos[name])

    def config(self) -> dict:
        path = self.path / "config.json"
        return _read_json(path) if path.is_file() else {}


def _read_json(path: Path) -> dict:
    """A JSON object from ``path``; anything else is a :class:`TensorFileError` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TensorFileError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise TensorFileError(f"{path} is not a JSON object")
    return value


def plan_shards(entries: list[tuple[str, tuple[int, ...], str]], max_shard_bytes: int) -> list[list]:
    """Split ``(name, shape, dtype_code)`` entries, in order, into shards of at most ``max_shard_bytes``."""
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = np.dtype(DTYPES[entry[2]]).itemsize * math.prod(entry[1])
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    if current or not shards:
        shards.append(current)
    return shards


class BlockReader:
    """Positional reads (``os.preadv``) of entry ranges of tensors: thread-safe, nothing mapped.

    Open on a set of files; ``read(info, start, out)`` fills ``out`` (an array
    of the tensor's dtype) with entries ``start .. start + out.size`` of the
    flattened tensor.  Reading into small reused buffers keeps the data in
    the CPU cache for the arithmetic that follows.
    """

    def __init__(self, files):
        self._fds = {}
        try:
            for f in dict.fromkeys(files):
                self._fds[f] = os.open(f, os.O_RDONLY)
        except OSError:
            self.close()
            raise

    def read(self, info: TensorInfo, start: int, out: np.ndarray) -> np.ndarray:
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset = info.offset + start * out.itemsize
        while len(view):
            n = os.preadv(self._fds[info.file], [view[:_IO_CHUNK]], offset)
            if n == 0:
                raise TensorFileError(f"{info.file} ends inside tensor data at byte {offset} (truncated file)")
            view, offset = view[n:], offset + n
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> "BlockReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardWriter:
    """Writes tensors into one ``.safetensors`` file whose layout is known up front.

    Every output shape and dtype is known before merging, so the header
    (padded with spaces to a multiple of 8) is written first; tensors, or
    entry ranges of them, are then written in place with ``os.pwrite``, in
    any order and from any thread.  ``close`` checks that every byte of every
    planned tensor was written exactly once.
    """

    def __init__(self, path: Path, entries: list[tuple[str, tuple[int, ...], str]]):
        header, offset = {}, 0
        for name, shape, code in entries:
            nbytes = np.dtype(DTYPES[code]).itemsize * math.prod(shape)
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        header["__metadata__"] = {"format": "pt"}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        start = 8 + len(blob)
        self.path = path
        self.slots = {name: TensorInfo(path, code, tuple(shape), start + header[name]["data_offsets"][0])
                      for name, shape, code in entries}
        self._missing = {name: info.nbytes for name, info in self.slots.items()}
        self._lock = threading.Lock()
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        if hasattr(os, "posix_fallocate"):      # reserve the blocks up front: a full disk fails here,
            os.posix_fallocate(self.fd, 0, start + offset)   # and ext4 then writes about 1.5x faster
        _pwrite_all(self.fd, struct.pack("<Q", len(blob)) + blob, 0)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the whole tensor ``name`` (its planned shape and dtype)."""
        info = self._slot(name, array)
        if tuple(array.shape) != info.shape:
            raise RuntimeError(f"out-of-plan write to {name}: shape {tuple(array.shape)}, planned {info.shape}")
        self.write_entries(name, 0, array.reshape(-1))

    def write_entries(self, name: str, start: int, flat: np.ndarray, again: bool = False) -> None:
        """Write the 1-D ``flat`` as entries ``start .. start + flat.size`` of tensor ``name``; ``again``: entries
        written before, now overwritten (not counted twice)."""
        info = self._slot(name, flat)
        if flat.ndim != 1 or start < 0 or start + flat.size > info.numel:
            raise RuntimeError(f"out-of-plan write to {name}: entries {start}..{start + flat.size} "
                               f"of {info.numel}")
        data = memoryview(np.ascontiguousarray(flat).view(np.uint8))
        with self._lock:
            self._missing[name] -= 0 if again else len(data)
        _pwrite_all(self.fd, data, info.offset + start * flat.itemsize)

    def rewrite_at(self, name: str, index: np.ndarray, values: np.ndarray) -> None:
        """Overwrite entries ``index`` of tensor ``name``, written before, with ``values`` (through a memory map
        of the output: scattered entries cost no system call each)."""
        info = self._slot(name, values)
        if index.size and (index.min() < 0 or index.max() >= info.numel):
            raise RuntimeError(f"out-of-plan rewrite of {name}: entries outside 0..{info.numel}")
        view = np.memmap(self.path, dtype=values.dtype, mode="r+", offset=info.offset, shape=(info.numel,))
        view[index] = values
        del view

    def _slot(self, name: str, array: np.ndarray) -> TensorInfo:
        info = self.slots.get(name)
        if info is None:
            raise RuntimeError(f"out-of-plan write: {name} is not planned for {self.path}")
        if CODES.get(array.dtype) != info.code:
            raise RuntimeError(f"out-of-plan write to {name}: dtype {array.dtype}, planned {info.code}")
        return info

    def close(self, check: bool = True) -> None:
        """Close the file; with ``check``, raise unless every planned byte was written exactly once."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        wrong = [name for name, left in self._missing.items() if left != 0]
        if check and wrong:
            raise RuntimeError(f"{self.path}: tensor {wrong[0]} was not written exactly once")


def _pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written (one call writes at most about 2 GB on Linux)."""
    view = memoryview(data)
    while len(view):
        n = os.pwrite(fd, view[:_IO_CHUNK], offset)
        view, offset = view[n:], offset + n


class RenamedView:
    """Some tensors of a :class:`Checkpoint` under other names, zero-copy (the same files and offsets): what the
    merge engine reads when a model keeps its language model under a prefix (``language_model.model.*``).

    ``names``: {name in the view: name in the checkpoint}; ``config``: what :meth:`config` returns (e.g. the
    language model's own config inside a multimodal one).
    """

    def __init__(self, checkpoint: Checkpoint, names: dict[str, str], config: dict | None = None):
        self.checkpoint, self.path = checkpoint, checkpoint.path
        self._names = dict(names)
        self._config = config
        self.names = list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._names

    def info(self, name: str) -> TensorInfo:
        return self.checkpoint.info(self._names[name])

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype_code(self, name: str) -> str:
        return self.info(name).code

    def file_of(self, name: str) -> Path:
        return self.info(name).file

    def array(self, name: str) -> np.ndarray:
        return read_array(self.info(name))

    def config(self) -> dict:
        return self.checkpoint.config() if self._config is None else self._config
