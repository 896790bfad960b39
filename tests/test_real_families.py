"""Real checkpoint families on tiny random models saved in their real layout: the key maps, strict loads of the
language model, its logits against the native class's, and the checks that two sources share one LLM."""

import json
from pathlib import Path

import pytest
import torch
from _real_checkpoints import BUILDERS, LLAMA_BASED, QWEN25_BASED, build

from mckit.models.families import (
    FAMILIES,
    FamilyError,
    check_same_text_base,
    family_of,
    llm_name,
    llm_names,
    read_config,
)
from mckit.models.mllm import MLLM
from mckit.models.real_llm import MRoPECausalLM, load_text_llm, read_llm_state


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """{kind: (folder, native model)} for every family the tests build."""
    root = tmp_path_factory.mktemp("real")
    return {kind: (root / kind, build(kind, root / kind)) for kind in BUILDERS}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_key_map_covers_the_language_model_exactly_once(saved, kind):
    folder, native = saved[kind]
    state = read_llm_state(folder)
    memory = {k for k in native.state_dict()}
    family = family_of(read_config(folder))
    from_memory = llm_names(family, memory)
    assert set(state) == set(from_memory)                         # disk and memory layouts map to the same names
    assert "lm_head.weight" in state and "model.embed_tokens.weight" in state
    assert all(k.startswith("model.") or k == "lm_head.weight" for k in state)
    native_state = native.state_dict()
    for mapped, name in from_memory.items():
        assert torch.equal(state[mapped], native_state[name]), mapped
    towers = [n for n in memory if any(t in n for t in ("visual", "tower", "projector", "image_newline"))]
    assert towers and all(llm_name(family, n) is None for n in towers)


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_language_model_alone_gives_the_native_text_logits(saved, kind):
    folder, native = saved[kind]
    llm = load_text_llm(folder)
    ids = torch.tensor([[5, 17, 42, 9, 250, 3, 77]])
    with torch.no_grad():
        want = native(input_ids=ids).logits                 # text only: every family's positions are 0 .. L-1
        got = llm(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert isinstance(llm, MRoPECausalLM) == (family_of(read_config(folder)).positions == "mrope")


def test_mrope_language_model_plugs_into_the_kits_mllm_with_3d_positions(saved):
    from mckit.models.adapters import MRoPEAdapter

    llm = load_text_llm(saved["qwen2_5_vl"][0])
    model = MLLM(llm, tokenizer=None, branches={})
    assert isinstance(model.adapter, MRoPEAdapter)
    ids = torch.tensor([[5, 17, 42, 9]])
    pos = model.adapter.position_ids(torch.ones_like(ids), [[]])
    with torch.no_grad():
        a = llm(input_ids=ids, position_ids=pos).logits
        b = llm(input_ids=ids).logits
    assert pos.shape == (3, 1, 4) and torch.allclose(a, b, atol=1e-6)


def test_sources_on_one_llm_pass_and_another_llm_is_named(saved):
    llama = {k: read_config(saved[k][0]) for k in LLAMA_BASED}
    qwen = {k: read_config(saved[k][0]) for k in QWEN25_BASED}
    check_same_text_base(llama)
    check_same_text_base(qwen)
    with pytest.raises(FamilyError, match=r"qwen2_audio: its language model differs from qwen2_5_vl's: hidden_size 96"):
        check_same_text_base({"qwen2_5_vl": qwen["qwen2_5_vl"], "qwen2_audio": read_config(saved["qwen2_audio"][0])})
    with pytest.raises(FamilyError, match="llava: its language model differs .*architecture llama .vs qwen2."):
        check_same_text_base({"qwen2_5_vl": qwen["qwen2_5_vl"], "llava": llama["llava"]})


def test_unknown_family_missing_config_and_missing_shard_are_named(saved, tmp_path):
    with pytest.raises(FamilyError, match=r"model_type 'gpt2' is not a family the kit knows; supported: .*llava"):
        family_of({"model_type": "gpt2"}, "some/model")
    with pytest.raises(FamilyError, match=r"config.json: not found"):
        read_config(tmp_path)
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text((saved["llava"][0] / "config.json").read_text())
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"language_model.lm_head.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FamilyError, match="shard model-00002-of-00002.safetensors listed in .* is missing"):
        load_text_llm(folder)


def test_every_family_names_a_class_of_transformers():
    import transformers

    assert all(hasattr(transformers, f.cls) for f in FAMILIES.values())


@pytest.fixture(scope="module")
def tokenizer():
    from _real_checkpoints import word_tokenizer

    return word_tokenizer()


def _native_logits(native, ids: list[int], **pixels) -> torch.Tensor:
    with torch.no_grad():
        return native(input_ids=torch.tensor([ids]), **pixels).logits


@pytest.mark.parametrize("kind, modality, token, keyword", [
    ("llava", "image", "image_token_index", "pixel_values"),
    ("video_llava", "image", "image_token_index", "pixel_values_images"),
    ("video_llava", "video", "video_token_index", "pixel_values_videos"),
    ("llava_next_video", "video", "video_token_index", "pixel_values_videos")])
def test_each_source_alone_in_a_composed_model_gives_its_native_logits(saved, tokenizer, kind, modality, token,
                                                                        keyword):
    from mckit.models.real_branches import load_branch

    folder, native = saved[kind]
    other = "video_llava" if kind == "llava" else "llava"
    branches = {modality: load_branch(folder, modality)}
    branches.update({m: load_branch(saved[other][0], m) for m in ("image", "video") if m not in branches
                     and (m == "image" or other == "video_llava")})
    composed = MLLM(load_text_llm(folder), tokenizer, branches)     # this source's LLM, every branch
    torch.manual_seed(1)
    x = torch.randn(1, *branches[modality].input_shape)
    batch = composed.batch([f"w5 w17 <{modality}> w42 w9"], [{modality: [x[0]]}])
    with torch.no_grad():
        got = composed(batch).logits
    n = branches[modality].n_tokens
    ids = [5, 17] + [getattr(native.config, token)] * n + [42, 9]
    want = _native_logits(native, ids, **{keyword: x})
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_a_branch_reads_only_its_tower_and_names_what_it_cannot_load(saved, tmp_path, monkeypatch):
    from mckit.models import real_branches

    read, opened = [], []
    real_open = real_branches.safe_open

    def spy(file, framework):
        opened.append(Path(file).name)
        handle = real_open(file, framework)
        get = handle.get_tensor
        handle_get = lambda name: (read.append(name), get(name))[1]  # noqa: E731
        return _Spy(handle, handle_get)

    monkeypatch.setattr(real_branches, "safe_open", spy)
    real_branches.load_branch(saved["video_llava"][0], "video")
    assert read and all(n.startswith(("video_tower.", "multi_modal_projector.")) for n in read)
    sharded = tmp_path / "sharded"
    saved["video_llava"][1].save_pretrained(sharded, max_shard_size="40KB")
    weight_map = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    holding = {f for n, f in weight_map.items() if n.startswith(("video_tower.", "multi_modal_projector."))}
    opened.clear()
    real_branches.load_branch(sharded, "video")
    assert len(set(weight_map.values())) > len(holding) and set(opened) == holding
    with pytest.raises(FamilyError, match="audio inputs of llava are not supported"):
        real_branches.load_branch(saved["llava"][0], "audio")


class _Spy:
    """A safe_open handle whose get_tensor is recorded (context manager like the real one)."""

    def __init__(self, handle, get):
        self.handle, self.get_tensor = handle, get

    def __enter__(self):
        self.handle.__enter__()
        return self

    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl", "qwen2_5_omni_thinker"])
def test_qwen_image_in_a_composed_model_gives_the_native_logits_with_3d_positions(saved, tokenizer, kind):
    """Qwen2-VL, Qwen2.5-VL and the Omni thinker: flattened patches of a 56 x 56 image (a 4 x 4 patch grid, 2 x 2 merged
    tokens), the image framed by vision start / end tokens, M-RoPE positions following the merged grid."""
    from mckit.models.real_branches import load_branch, real_mllm

    folder, native = saved[kind]
    branch = load_branch(folder, "image", size=56)
    assert branch.n_tokens == 4 and branch.input_shape == (16, 3 * 2 * 14 * 14)
    model = real_mllm(load_text_llm(folder), tokenizer, {"image": branch})
    torch.manual_seed(2)
    x = torch.randn(1, *branch.input_shape)
    with torch.no_grad():
        got = model(model.batch(["w5 w17 w302 <image> w303 w42 w9"], [{"image": [x[0]]}])).logits
        ids = torch.tensor([[5, 17, 302] + [300] * 4 + [303, 42, 9]])
        types = {} if kind == "qwen2_5_omni_thinker" else {"mm_token_type_ids": (ids == 300).int()}  # Omni: finds them
        want = native(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=x[0],
                      image_grid_thw=torch.tensor([[1, 4, 4]]), **types).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_audio_flamingo_audio_in_a_composed_model_gives_the_native_logits(saved, tokenizer):
    from mckit.models.real_branches import load_branch, real_mllm

    folder, native = saved["audioflamingo3"]
    branch = load_branch(folder, "audio")
    assert branch.input_shape == (16, 100) and branch.n_tokens == 25     # 100 frames: conv stride 2, pool 2
    model = real_mllm(load_text_llm(folder), tokenizer, {"audio": branch})
    torch.manual_seed(4)
    x = torch.randn(2, *branch.input_shape)
    batch = model.batch(["w5 <audio> w17 <audio> w9"], [{"audio": [x[0], x[1]]}])
    with torch.no_grad():
        got = model(batch).logits
        ids = torch.tensor([[5] + [300] * 25 + [17] + [300] * 25 + [9]])
        want = native(input_ids=ids, input_features=x, input_features_mask=torch.ones(2, 100, dtype=torch.long)).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
