"""`python -m mckit compose` on tiny random checkpoints in their real layouts: the streamed merge equals the
in-memory one, the folder opens with plain transformers and with `load_composed`, bad input writes nothing."""

import json

import pytest
import torch
from _real_checkpoints import build, build_base

from mckit.__main__ import main
from mckit.compose.checkpoints import compose_checkpoints, load_composed
from mckit.merge.engine import merge_state_dict
from mckit.models.families import FamilyError
from mckit.models.real_llm import read_llm_state


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("compose")
    base = build_base("llava", root / "vicuna")
    return {"root": root, "base": (root / "vicuna", base),
            "llava": (root / "llava", build("llava", root / "llava", 1, base)),
            "video_llava": (root / "video_llava", build("video_llava", root / "video_llava", 2, base))}


def test_streamed_merge_of_real_layouts_equals_the_in_memory_merge(llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = compose_checkpoints("ties", llama["base"][0], [str(llama["llava"][0]), f"{llama['video_llava'][0]}:video"],
                              tmp_path / "composed", progress=False, keep=0.5, lam=0.7)
    want = merge_state_dict("ties", llama["base"][1].state_dict(),
                            [read_llm_state(llama[k][0]) for k in ("llava", "video_llava")], keep=0.5, lam=0.7)
    llm, info = AutoModelForCausalLM.from_pretrained(out / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got = llm.state_dict()
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-6), name
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["branches"] == {"image": "branches/image", "video": "branches/video"}
    assert manifest["sources"][1]["modalities"] == ["video"] and manifest["positions"] == "1d"


def test_one_source_composed_alone_answers_like_its_native_model(llama, tmp_path):
    """Merged linears, and every other LLM tensor from the base: a base that is the source's own LLM gives the
    source back exactly."""
    from _real_checkpoints import word_tokenizer

    from mckit.models.real_llm import load_text_llm

    load_text_llm(llama["llava"][0]).save_pretrained(tmp_path / "own")
    word_tokenizer().save_pretrained(tmp_path / "own")
    out = compose_checkpoints("average", tmp_path / "own", [f"{llama['llava'][0]}:image"], tmp_path / "one",
                              progress=False)
    model = load_composed(out)
    assert model.modalities == ["image"] and model.tokenizer is not None
    torch.manual_seed(3)
    x = torch.randn(1, *model.branches["image"].input_shape)
    with torch.no_grad():
        got = model(model.batch(["w5 w17 <image> w42 w9"], [{"image": [x[0]]}])).logits
        native = llama["llava"][1]
        ids = [5, 17] + [native.config.image_token_index] * model.branches["image"].n_tokens + [42, 9]
        want = native(input_ids=torch.tensor([ids]), pixel_values=x).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_bad_compositions_are_named_and_write_nothing(llama, tmp_path):
    qwen = build("qwen2_audio", llama["root"] / "qwen2_audio")
    build("llava", llama["root"] / "unrelated", 7)          # a LLaVA on a vicuna of its own (same shapes)
    assert qwen is not None
    cases = [([str(llama["root"] / "qwen2_audio")], "qwen2_audio: its language model differs"),
             ([str(llama["root"] / "unrelated")], r"unrelated is not a fine-tune of the base: its "
              r"model.layers.0.\S+ lies at a relative distance of 1.4\d"),
             ([f"{llama['llava'][0]}:image", f"{llama['video_llava'][0]}:image"], "image is given by both"),
             ([f"{llama['llava'][0]}:audio"], "gives no audio branch"),
             ([str(llama["llava"][0]), str(llama["llava"][0])], "same checkpoint")]
    for sources, message in cases:
        with pytest.raises((FamilyError, ValueError), match=message):
            compose_checkpoints("average", llama["base"][0], sources, tmp_path / "bad", progress=False)
        assert not (tmp_path / "bad").exists()
    code = main(["compose", "--method", "ties", "--base", str(llama["base"][0]), "--sources",
                 str(llama["root"] / "qwen2_audio"), "--out", str(tmp_path / "bad")])
    assert code == 2 and not (tmp_path / "bad").exists()


def test_merge_command_on_real_qwen_layouts_merges_the_llm_and_copies_the_vision_tower(tmp_path):
    """The OptMerge setting: experts of one Qwen-VL base merged in their on-disk layout (``model.*`` + ``visual.*``);
    the vision tower and merger come from the base, the language model's linears are merged."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from mckit.merge.engine import merge_checkpoints

    models = [build("qwen2_5_vl", tmp_path / name, seed) for seed, name in enumerate(("base", "ocr", "chart"))]
    out = merge_checkpoints("ties", tmp_path / "base", [tmp_path / "ocr", tmp_path / "chart"], tmp_path / "merged",
                            progress=False)
    merged, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    got, states = merged.state_dict(), [m.state_dict() for m in models]
    visual = [n for n in got if ".visual." in n]
    assert visual and all(torch.equal(got[n], states[0][n]) for n in visual)
    want = merge_state_dict("ties", states[0], states[1:], include=r".*language_model\.layers\.\d+\..*_proj\.weight")
    linears = [n for n in got if "language_model.layers" in n and n.endswith("_proj.weight")]
    assert linears and all(torch.allclose(got[n], want[n], atol=1e-6) for n in linears)
    assert not torch.equal(got[linears[0]], states[0][linears[0]])


def test_a_real_layout_mcub_set_evaluates_end_to_end_and_batches_like_one_by_one(llama, tmp_path):
    from _real_checkpoints import evaluate_twice, save_clip_processor

    for kind in ("llava", "video_llava"):
        save_clip_processor(llama[kind][0])
    out = compose_checkpoints("task_arithmetic", llama["base"][0], [f"{llama['llava'][0]}:image",
                              f"{llama['video_llava'][0]}:video"], tmp_path / "av", progress=False, lam=0.5)
    items, batched, alone = evaluate_twice(out, tmp_path / "mcub")
    assert batched["n"] == 3 and batched["answers"] == alone["answers"]
    assert batched["acc"] == sum(a[:1] == it.answer for a, it in zip(batched["answers"], items)) / 3
    assert [it.answer for it in items] == ["A", "B", "C"]


def test_media_the_kit_cannot_decode_is_named(tmp_path):
    from mckit.eval.media import MediaError, decode

    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    with pytest.raises(MediaError, match=r"clip.gif: image files of type '.gif' are not supported; use .jpg"):
        decode(tmp_path / "clip.gif", "image")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(MediaError, match=r"broken.mp4: cannot decode this video file"):
        decode(tmp_path / "broken.mp4", "video")
    with pytest.raises(MediaError, match="file not found"):
        decode(tmp_path / "none.wav", "audio")


def test_audio_sources_compose_over_a_qwen_base_and_evaluate_wav_files(tmp_path):
    from _real_checkpoints import save_whisper_extractor, write_mcub

    from mckit.compose.checkpoints import composed_preprocessors
    from mckit.eval.mcub_reader import load_split
    from mckit.eval.real import evaluate_real

    base = build_base("audioflamingo3", tmp_path / "qwen")
    build("audioflamingo3", tmp_path / "af3", 1, base)
    save_whisper_extractor(tmp_path / "af3")
    out = compose_checkpoints("average", tmp_path / "qwen", [str(tmp_path / "af3")], tmp_path / "composed",
                              progress=False)
    write_mcub(tmp_path / "mcub", 2, ("audio",))
    items = load_split(tmp_path / "mcub" / "MCUB-4.json", tmp_path / "mcub" / "MCUB-answer.json", tmp_path / "mcub")
    model = load_composed(out)
    result = evaluate_real(model, items, composed_preprocessors(out), template="{prompt}", batch_size=2,
                           max_new_tokens=2, progress=False)
    assert model.modalities == ["audio"] and result["n"] == 2 and len(result["answers"]) == 2


def test_a_composed_model_runs_in_bfloat16(llama, tmp_path):
    out = compose_checkpoints("average", llama["base"][0], [f"{llama['video_llava'][0]}:image,video"],
                              tmp_path / "bf16", progress=False)
    model = load_composed(out, dtype=torch.bfloat16)
    assert next(model.llm.parameters()).dtype == torch.bfloat16
    shapes = {m: b.input_shape for m, b in model.branches.items()}
    batch = model.batch(["w5 <video> w6 <image> w7"], [{m: [torch.randn(s)] for m, s in shapes.items()}])
    answers = model.generate(batch, 3)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_a_qwen_vl_source_over_a_plain_qwen2_base_keeps_its_3d_positions(tmp_path):
    from _real_checkpoints import word_tokenizer

    from mckit.models.adapters import MRoPEAdapter
    from mckit.models.real_llm import MRoPECausalLM

    base = build_base("qwen2_5_vl", tmp_path / "qwen")
    build("qwen2_5_vl", tmp_path / "vl", 1, base)
    out = compose_checkpoints("ties", tmp_path / "qwen", [str(tmp_path / "vl")], tmp_path / "composed",
                              progress=False)
    model = load_composed(out, size=56, tokenizer=word_tokenizer())   # AutoTokenizer would read it as Qwen2's BPE
    assert isinstance(model.llm, MRoPECausalLM) and isinstance(model.adapter, MRoPEAdapter)
    assert model.adapter.grids == {"image": (1, 2, 2), "video": (4, 2, 2)}       # both of its branches
    batch = model.batch(["w5 w302 <image> w303 w9"], [{"image": [torch.randn(model.branches["image"].input_shape)]}])
    assert batch.position_ids.shape == (3, 1, 8) and batch.position_ids[:, 0, 2:6].T.tolist()[3] == [2, 3, 3]
    assert len(model.generate(batch, 2)) == 1


def test_a_source_given_as_text_adds_its_language_model_and_no_branch(llama, tmp_path):
    out = compose_checkpoints("average", llama["base"][0], [f"{llama['llava'][0]}:image",
                                                            f"{llama['video_llava'][0]}:text"], tmp_path / "c",
                              progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["branches"] == {"image": "branches/image"} and manifest["sources"][1]["modalities"] == []
    want = merge_state_dict("average", llama["base"][1].state_dict(),
                            [read_llm_state(llama[k][0]) for k in ("llava", "video_llava")])
    from safetensors.torch import load_file

    got = load_file(str(out / "llm" / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.allclose(got[name], want[name], atol=1e-6)
