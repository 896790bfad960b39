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


def _omni_audio_mask(n: int, frames: int = 100) -> torch.Tensor:
    return torch.ones(n, frames, dtype=torch.long)


def test_omni_audio_in_a_composed_model_gives_the_native_logits(saved, tokenizer):
    """The Omni thinker's audio: 100 log-mel frames -> 25 tokens (conv stride 2, pool 2), framed by audio start /
    end (305 / 306); its M-RoPE positions advance like text's, as the thinker's rope index lays audio out."""
    from mckit.models.real_branches import load_branch, real_mllm

    folder, native = saved["qwen2_5_omni_thinker"]
    branch = load_branch(folder, "audio")
    assert branch.input_shape == (16, 100) and branch.n_tokens == 25
    model = real_mllm(load_text_llm(folder), tokenizer, {"audio": branch})
    torch.manual_seed(5)
    x = torch.randn(2, *branch.input_shape)
    batch = model.batch(["w5 w305 <audio> w306 w17 w305 <audio> w306 w9"], [{"audio": [x[0], x[1]]}])
    assert batch.position_ids[:, 0].tolist() == [list(range(batch.position_ids.shape[-1]))] * 3
    with torch.no_grad():
        got = model(batch).logits
        ids = torch.tensor([[5, 305] + [304] * 25 + [306, 17, 305] + [304] * 25 + [306, 9]])
        want = native(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=x,
                      feature_attention_mask=_omni_audio_mask(2)).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_omni_image_and_audio_together_give_the_native_logits_with_its_3d_positions(saved, tokenizer):
    """An image (3-D grid positions) and an audio clip (text-like positions) in one Omni prompt: the rope index's
    layout of both: the text after the image resumes one past its largest index, the audio runs on like text."""
    from mckit.models.real_branches import load_branch, real_mllm

    folder, native = saved["qwen2_5_omni_thinker"]
    branches = {"image": load_branch(folder, "image", size=56), "audio": load_branch(folder, "audio")}
    model = real_mllm(load_text_llm(folder), tokenizer, branches)
    torch.manual_seed(6)
    image, audio = torch.randn(1, *branches["image"].input_shape), torch.randn(1, *branches["audio"].input_shape)
    batch = model.batch(["w5 w302 <image> w303 w17 w305 <audio> w306 w9"], [{"image": [image[0]], "audio": [audio[0]]}])
    with torch.no_grad():
        got = model(batch).logits
        ids = torch.tensor([[5, 302] + [300] * 4 + [303, 17, 305] + [304] * 25 + [306, 9]])
        mask, grid = torch.ones_like(ids), torch.tensor([[1, 4, 4]])
        want = native(input_ids=ids, attention_mask=mask, pixel_values=image[0], image_grid_thw=grid,
                      input_features=audio, feature_attention_mask=_omni_audio_mask(1)).logits
        index, _ = native.model.get_rope_index(ids, grid, None, mask, audio_seqlens=torch.tensor([100]))
    assert torch.equal(batch.position_ids, index)
    assert batch.position_ids[:, 0, 9:11].T.tolist() == [[7, 7, 7], [8, 8, 8]]    # image up to 3, w303 w17 w305 4-6
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_qwen2_audio_alone_in_a_composed_model_gives_the_native_logits(saved, tokenizer):
    """Qwen2-Audio: exactly 2 x max_source_positions mel frames (the tiny tower: 16 bins, 100 frames; the real one
    128 x 3000), its tower then its projector, 25 tokens."""
    from mckit.models.real_branches import load_branch, real_mllm

    folder, native = saved["qwen2_audio"]
    branch = load_branch(folder, "audio")
    assert branch.input_shape == (16, 2 * native.config.audio_config.max_source_positions) and branch.n_tokens == 25
    model = real_mllm(load_text_llm(folder), tokenizer, {"audio": branch})
    torch.manual_seed(7)
    x = torch.randn(2, *branch.input_shape)
    with torch.no_grad():
        got = model(model.batch(["w5 <audio> w17 <audio> w9"], [{"audio": [x[0], x[1]]}])).logits
        ids = torch.tensor([[5] + [300] * 25 + [17] + [300] * 25 + [9]])
        want = native(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=x,
                      feature_attention_mask=torch.ones(2, 100, dtype=torch.long)).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def _video_patches_by_hand(frames, mean, std, temporal=2, merge=2, patch=14) -> torch.Tensor:
    """Qwen2-VL's video patches of (F, S, S, 3) uint8 frames, one patch at a time: rows (ti, bh, bw, mh, mw),
    each (c, k, y, x) of frame ti * T + k."""
    x = (torch.tensor(frames).permute(0, 3, 1, 2).double() / 255 - torch.tensor(mean)[:, None, None]) \
        / torch.tensor(std)[:, None, None]
    blocks = x.shape[-1] // (patch * merge)
    rows = []
    for ti in range(len(frames) // temporal):
        for bh in range(blocks):
            for bw in range(blocks):
                for mh in range(merge):
                    for mw in range(merge):
                        y0, x0 = (bh * merge + mh) * patch, (bw * merge + mw) * patch
                        group = [x[ti * temporal + k, :, y0:y0 + patch, x0:x0 + patch] for k in range(temporal)]
                        rows.append(torch.stack(group, dim=1).reshape(-1))
    return torch.stack(rows).float()


@pytest.mark.parametrize("kind", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_video_in_a_composed_model_gives_the_native_logits_with_3d_positions(saved, tokenizer, kind, tmp_path):
    """8 frames of 56 x 56 pixels: video patches built from the image processor's (grid (4, 4, 4), 4 temporal x
    2 x 2 merged tokens), equal to a by-hand patching; positions from the grid, Qwen2.5-VL's temporal index at
    tokens_per_second x 1 s per temporal patch, the text after resuming at the video's start + max(h, w)."""
    import numpy as np
    from _real_checkpoints import save_qwen_processor

    from mckit.models.qwen_video import SECONDS_PER_GRID
    from mckit.models.real_branches import load_branch, preprocessor, real_mllm

    folder, native = saved[kind]
    save_qwen_processor(folder)
    branch = load_branch(folder, "video", size=56)
    assert branch.n_tokens == 16 and branch.input_shape == (64, 3 * 2 * 14 * 14)
    frames = np.random.default_rng(8).integers(0, 256, (8, 56, 56, 3), dtype=np.uint8)
    x = preprocessor(folder, "video", 56)(frames)
    processor = __import__("transformers").AutoImageProcessor.from_pretrained(folder)
    assert torch.allclose(x, _video_patches_by_hand(frames, processor.image_mean, processor.image_std), atol=1e-5)
    model = real_mllm(load_text_llm(folder), tokenizer, {"video": branch})
    batch = model.batch(["w5 w17 w302 <video> w303 w42 w9"], [{"video": [x]}])
    step = native.config.vision_config.tokens_per_second if kind == "qwen2_5_vl" else 1
    assert batch.position_ids[0, 0, 3:19:4].tolist() == [3 + step * t for t in range(4)]
    assert batch.position_ids[:, 0, 19].tolist() == [5, 5, 5]
    with torch.no_grad():
        got = model(batch).logits
        ids = torch.tensor([[5, 17, 302] + [301] * 16 + [303, 42, 9]])
        seconds = {"second_per_grid_ts": torch.tensor([SECONDS_PER_GRID])} if kind == "qwen2_5_vl" else {}
        want = native(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=x,
                      video_grid_thw=torch.tensor([[4, 4, 4]]), mm_token_type_ids=2 * (ids == 301).int(),
                      **seconds).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_llava_next_video_anyres_image_in_a_composed_model_gives_the_native_logits(saved, tokenizer):
    """LLaVA-NeXT-Video's image: a 56 x 56 square (the largest square pinpoint of the tiny tower) tiled by its own
    processor into the whole image + 2 x 2 tiles of 28 x 28; 4 base tokens, then 4 x 4 tile tokens with an
    image_newline closing each of the 4 rows: 24 tokens."""
    import numpy as np
    from _real_checkpoints import save_anyres_processor
    from PIL import Image

    from mckit.models.real_branches import load_branch, preprocessor

    folder, native = saved["llava_next_video"]
    save_anyres_processor(folder)
    branch = load_branch(folder, "image")
    assert branch.input_shape == (5, 3, 28, 28) and branch.n_tokens == 24
    image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    x = preprocessor(folder, "image")(image)
    model = MLLM(load_text_llm(folder), tokenizer, {"image": branch})
    with torch.no_grad():
        got = model(model.batch(["w5 w17 <image> w42 w9"], [{"image": [x]}])).logits
        want = _native_logits(native, [5, 17] + [300] * 24 + [42, 9], pixel_values=x[None],
                              image_sizes=torch.tensor([[56, 56]]))
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


@pytest.mark.parametrize("kind", ["qwen2_audio", "qwen2_5_omni_thinker"])
def test_audio_preprocessor_pads_or_cuts_a_clip_to_the_branch_frames(saved, kind, tmp_path):
    """Whatever clip length the saved extractor pads to (3 s here), a clip becomes the branch's 2 x
    max_source_positions frames: a short one padded, a long one cut."""
    import numpy as np
    from _real_checkpoints import save_whisper_extractor

    from mckit.models.real_branches import load_branch, preprocessor

    folder = tmp_path / kind
    saved[kind][1].save_pretrained(folder)
    save_whisper_extractor(folder, seconds=3)
    shape = load_branch(folder, "audio").input_shape
    process = preprocessor(folder, "audio")
    rng = np.random.default_rng(10)
    short, long = (process(rng.standard_normal(n).astype(np.float32)) for n in (4_000, 40_000))
    assert tuple(short.shape) == tuple(long.shape) == shape == (16, 100)
    assert not torch.equal(short, long)
