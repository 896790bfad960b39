"""numpy reading/writing of safetensors files, checked against the safetensors library."""

import json
import struct

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mckit.storage import tensorfiles as T


def _library_file(path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "w32": torch.randn(5, 7, generator=g),
        "w16": torch.randn(3, 4, generator=g).half(),
        "wbf": torch.randn(6, generator=g).to(torch.bfloat16),
        "w64": torch.randn(2, 2, generator=g).double(),
        "ids": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def _as_torch(array):
    """numpy (ml_dtypes bfloat16 included) -> torch, bit for bit."""
    if array.dtype == T.DTYPES["BF16"]:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(array))


def test_read_matches_library_for_every_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _library_file(path)
    infos = T.read_header(path)
    assert set(infos) == set(tensors)
    offsets = [i.offset for i in infos.values()]
    assert offsets == sorted(offsets)                       # file order
    for name, expected in tensors.items():
        got = T.read_array(infos[name])
        assert got.shape == tuple(expected.shape)
        assert torch.equal(_as_torch(got), expected), name


def test_mapped_array_is_copy_on_write(tmp_path):
    path = tmp_path / "model.safetensors"
    _library_file(path)
    before = path.read_bytes()
    array = T.read_array(T.read_header(path)["w32"])
    array[0, 0] = 1e9
    del array
    assert path.read_bytes() == before


def test_writer_output_reads_back_in_library(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _library_file(path)
    infos = T.read_header(path)
    entries = [(n, i.shape, i.code) for n, i in infos.items()]
    writer = T.ShardWriter(tmp_path / "copy.safetensors", entries)
    for name, info in infos.items():
        writer.write(name, T.read_array(info))
    writer.close()
    with safe_open(tmp_path / "copy.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
        for name, expected in tensors.items():
            assert torch.equal(f.get_tensor(name), expected), name


def test_writer_checks_plan_and_that_every_byte_is_written_once(tmp_path):
    writer = T.ShardWriter(tmp_path / "x.safetensors", [("a", (2, 3), "F32"), ("b", (4,), "F16")])
    with pytest.raises(RuntimeError, match="c is not planned"):
        writer.write("c", np.zeros(2, np.float32))
    with pytest.raises(RuntimeError, match="dtype float16, planned F32"):
        writer.write("a", np.zeros((2, 3), np.float16))
    with pytest.raises(RuntimeError, match=r"shape \(3, 2\), planned \(2, 3\)"):
        writer.write("a", np.zeros((3, 2), np.float32))
    with pytest.raises(RuntimeError, match="entries 3..5 of 4"):
        writer.write_entries("b", 3, np.zeros(2, np.float16))
    writer.write_entries("b", 2, np.array([3, 4], np.float16))       # out of order, in parts
    writer.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.write_entries("b", 0, np.array([1, 2], np.float16))
    writer.close()
    with safe_open(tmp_path / "x.safetensors", framework="np") as f:
        assert f.get_tensor("b").tolist() == [1, 2, 3, 4] and f.get_tensor("a").shape == (2, 3)


@pytest.mark.parametrize("writes", [[("a", 0, 6)], [("a", 0, 6), ("b", 0, 2)], [("a", 0, 6), ("a", 0, 2), ("b", 0, 4)]])
def test_writer_close_refuses_missing_or_repeated_bytes(tmp_path, writes):
    writer = T.ShardWriter(tmp_path / "x.safetensors", [("a", (2, 3), "F32"), ("b", (4,), "F32")])
    for name, start, count in writes:
        writer.write_entries(name, start, np.zeros(count, np.float32))
    with pytest.raises(RuntimeError, match="was not written exactly once"):
        writer.close()


def test_block_reader_reads_ranges_and_names_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    tensors = _library_file(path)
    infos = T.read_header(path)
    with T.BlockReader([path]) as reader:
        got = reader.read(infos["w32"], 9, np.empty(10, np.float32))
        assert torch.equal(torch.from_numpy(got), tensors["w32"].reshape(-1)[9:19])
        bf = reader.read(infos["wbf"], 2, np.empty(3, T.DTYPES["BF16"]))
        assert torch.equal(_as_torch(bf), tensors["wbf"][2:5])
    short = tmp_path / "short.safetensors"
    short.write_bytes(path.read_bytes()[: infos["w32"].offset + 8])
    with T.BlockReader([short]) as reader, pytest.raises(T.TensorFileError, match="short.safetensors ends inside"):
        reader.read(T.TensorInfo(short, "F32", (5, 7), infos["w32"].offset), 0, np.empty(35, np.float32))


def test_plan_shards_respects_size():
    entries = [(f"t{i}", (10,), "F32") for i in range(5)]           # 40 bytes each
    assert [len(s) for s in T.plan_shards(entries, 100)] == [2, 2, 1]
    assert T.plan_shards([], 100) == [[]]


def _header_file(path, header, data_bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + b"\0" * data_bytes)
    return path


@pytest.mark.parametrize("case, pattern", [
    ("short", "not a safetensors file"),
    ("length", "not a safetensors file"),
    ("json", "unreadable safetensors header"),
    ("dtype", "tensor w .* unsupported dtype F8_E4M3"),
    ("entry", "tensor w .* malformed header entry .*shape"),
    ("object", "unreadable safetensors header: not a JSON object"),
    ("offsets", "tensor w .* data_offsets 0..12 do not match shape"),
    ("size", "tensor w .* do not match .* the file size"),
])
def test_bad_files_name_file_and_tensor(tmp_path, case, pattern):
    path = tmp_path / "bad.safetensors"
    if case == "short":
        path.write_bytes(b"\x01\x02")
    elif case == "length":
        path.write_bytes(struct.pack("<Q", 10**6) + b"{}")
    elif case == "json":
        path.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif case == "object":
        _header_file(path, [1, 2], 8)
    else:
        meta = {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}
        if case == "dtype":
            meta["dtype"] = "F8_E4M3"
        if case == "offsets":
            meta["data_offsets"] = [0, 12]
        if case == "entry":
            del meta["shape"]
        _header_file(path, {"w": meta}, 16 if case != "size" else 8)
    with pytest.raises(T.TensorFileError, match=pattern) as err:
        T.read_header(path)
    assert str(path) in str(err.value)


def test_checkpoint_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    save_file({"a": torch.zeros(2)}, str(tmp_path / "s1.safetensors"))
    (tmp_path / T.INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "s1.safetensors",
                                                                    "b": "s1.safetensors"}}))
    with pytest.raises(T.TensorFileError, match=r"tensor b listed in .*index\.json is not in .*s1\.safetensors"):
        T.Checkpoint(tmp_path)
