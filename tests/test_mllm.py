import itertools

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mckit.merge.task_vectors import task_vector
from mckit.models.batch import PLACEHOLDER_ID, split_prompt
from mckit.models.checkpoints import CheckpointError, load_mllm, save_mllm
from mckit.models.training import add_lora, make_llm
from mckit.world.entities import MODALITIES
from mckit.world.render import render
from mckit.world.tasks import chat


def _inputs(world, mods, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for i, m in enumerate(mods):
        out.setdefault(m, []).append(render(m, world, world.entities[i], "high", rng))
    return out


def test_split_prompt():
    assert split_prompt("a <image> b <audio>c") == ["a", ("image",), "b", ("audio",), "c"]


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_splicing_puts_features_at_placeholders(world, tiny_mllm, n):
    """For every order of n modalities, slot positions get the projected features and nothing else changes."""
    model = tiny_mllm
    for mods in itertools.permutations(MODALITIES, n):
        prompt = chat(" ".join(f"{m} : <{m}> ." for m in mods) + " what is this ?")
        batch = model.batch([prompt, chat("what is this ?")], [_inputs(world, mods), {}])
        embeds = model.embed(batch)
        plain = model.llm.get_input_embeddings()(batch.input_ids.clamp(min=0))
        touched = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
        for m in mods:
            rows, cols = batch.slots[m]
            expect = model.branches[m].project(batch.feats[m]).reshape(-1, embeds.shape[-1])
            torch.testing.assert_close(embeds[rows, cols], expect)
            touched[rows, cols] = True
            assert (batch.input_ids[rows, cols] == PLACEHOLDER_ID).all()
            assert (batch.routes[rows, cols] == model.route_ids[m]).all()
        assert (batch.routes[~touched] == 0).all() and (batch.input_ids[~touched] >= 0).all()
        assert touched.sum() == sum(model.branches[m].n_tokens for m in mods)
        torch.testing.assert_close(embeds[~touched], plain[~touched])
        # slots appear in prompt order, each right after "<modality> :"
        starts = sorted((batch.slots[m][1][0].item(), m) for m in mods)
        assert [m for _, m in starts] == list(mods)
        for col, m in starts:
            word = model.tokenizer.convert_ids_to_tokens(int(batch.input_ids[0, col - 1]))
            assert word == ":" and model.tokenizer.convert_ids_to_tokens(int(batch.input_ids[0, col - 2])) == m


def test_repeated_modality_keeps_order(world, tiny_mllm):
    rng = np.random.default_rng(0)
    xs = [render("image", world, world.entities[i], "high", rng) for i in range(3)]
    batch = tiny_mllm.batch([chat("image : <image> image : <image> image : <image> ?")], [{"image": xs}])
    feats = tiny_mllm.branches["image"].encode(torch.from_numpy(np.stack(xs)))
    torch.testing.assert_close(batch.feats["image"], feats)
    cols = batch.slots["image"][1].reshape(3, -1)
    assert (cols[1:, 0] > cols[:-1, 0]).all()


def test_left_padding_and_labels(world, tiny_mllm):
    batch = tiny_mllm.batch([chat("what is this ?"), chat("image : <image> what is this ?")],
                            [{}, _inputs(world, ["image"])], answers=["bedu", "yes it is a bedu"])
    assert batch.attention_mask[0, 0] == 0 and batch.attention_mask[:, -1].all()
    answer = batch.labels[1][batch.labels[1] != -100].tolist()
    assert answer == tiny_mllm.tokenizer("yes it is a bedu", add_special_tokens=False)["input_ids"] + [
        tiny_mllm.tokenizer.eos_token_id]
    assert (batch.position_ids[0][batch.attention_mask[0] == 1] == torch.arange(int(batch.attention_mask[0].sum()))).all()


def test_bad_inputs_are_named(world, tiny_mllm):
    x = _inputs(world, ["image"])
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        tiny_mllm.batch([chat("smell : <smell> ?")], [{}])
    with pytest.raises(ValueError, match="1 <image> placeholder.*but 0 image input"):
        tiny_mllm.batch([chat("image : <image> ?")], [{"image": []}], encoded=True)
    with pytest.raises(ValueError, match="0 <image> placeholder.*but 1 image input"):
        tiny_mllm.batch([chat("what is this ?")], [x])
    with pytest.raises(ValueError, match="unknown modality 'smell'"):
        tiny_mllm.encode_inputs([{"smell": [np.zeros(3)]}])


def _same_outputs(a, b, world):
    prompt = chat("image : <image> audio : <audio> what is this ?")
    inputs = [_inputs(world, ["image", "audio"])]
    la, lb = a(a.batch([prompt], inputs)).logits, b(b.batch([prompt], inputs)).logits
    torch.testing.assert_close(la, lb, rtol=0, atol=1e-6)  # weights are exact; kernels may differ


def test_save_load_round_trip_full(world, tiny_mllm, tmp_path):
    save_mllm(tiny_mllm, tmp_path / "m")
    loaded = load_mllm(tmp_path / "m")
    for (ka, va), (kb, vb) in zip(tiny_mllm.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    _same_outputs(tiny_mllm, loaded, world)
    with pytest.raises(FileExistsError):
        save_mllm(tiny_mllm, tmp_path / "m")


def test_save_load_round_trip_lora(world, tiny_mllm, tmp_path):
    tiny_mllm.llm.save_pretrained(tmp_path / "base")
    base = make_llm(tiny_mllm.tokenizer, hidden=32, layers=2, heads=2, intermediate=64, seed=0)
    add_lora(tiny_mllm, rank=4)
    with torch.no_grad():  # make the LoRA update non-zero
        for n, p in tiny_mllm.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    save_mllm(tiny_mllm, tmp_path / "m", base_path=tmp_path / "base")
    loaded = load_mllm(tmp_path / "m")
    _same_outputs(tiny_mllm.eval(), loaded, world)
    tau = task_vector(loaded, base)
    assert len(tau) == 2 * 7
    name = "model.layers.0.self_attn.q_proj.weight"
    layer = tiny_mllm.llm.base_model.model.model.layers[0].self_attn.q_proj
    expect = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
    torch.testing.assert_close(tau[name], expect)


def test_missing_and_corrupt_checkpoints(tiny_mllm, tmp_path):
    save_mllm(tiny_mllm, tmp_path / "m")
    (tmp_path / "m" / "branches.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt safetensors file .*branches.safetensors"):
        load_mllm(tmp_path / "m")
    (tmp_path / "m" / "branches.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing safetensors file: .*branches.safetensors"):
        load_mllm(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no mllm.json"):
        load_mllm(tmp_path)


def test_checkpoint_from_another_base(tokenizer, tiny_mllm, tmp_path):
    save_mllm(tiny_mllm, tmp_path / "m")
    state = {k: v for k, v in tiny_mllm.branches["image"].state_dict().items()}
    bad = {f"image.{k}": v for k, v in state.items()} | {"image.projector.net.2.weight": torch.zeros(48, 32)}
    other = {f"{m}.{k}": v for m in ("audio", "video", "point") for k, v in tiny_mllm.branches[m].state_dict().items()}
    save_file(bad | other, str(tmp_path / "m" / "branches.safetensors"))
    with pytest.raises(CheckpointError, match=r"'image.projector.net.2.weight' has shape \(48, 32\)"):
        load_mllm(tmp_path / "m")
    other_base = make_llm(tokenizer, hidden=48, layers=2, heads=2, intermediate=64)
    with pytest.raises(CheckpointError, match="built on another base"):
        task_vector(tiny_mllm, other_base)


def test_load_llm_reads_sharded_checkpoints_and_names_a_missing_shard(tiny_mllm, tmp_path):
    from mckit.models.checkpoints import load_llm

    tiny_mllm.llm.save_pretrained(tmp_path / "llm", max_shard_size="50KB")
    shards = sorted((tmp_path / "llm").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "llm" / "model.safetensors.index.json").is_file()
    loaded = load_llm(tmp_path / "llm")
    for (ka, va), (kb, vb) in zip(tiny_mllm.llm.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    shards[-1].unlink()
    with pytest.raises(CheckpointError, match=f"missing safetensors file: .*{shards[-1].name}"):
        load_llm(tmp_path / "llm")


def test_a_branch_with_any_encoder_projector_and_several_positions(tiny_mllm, world):
    """A branch is any (encoder, projector, n_tokens): here 3 positions per input, like a real vision tower's 576."""
    from torch import nn

    from mckit.models.mllm import MLLM, Branch

    class Split(nn.Module):          # (B, T, d_enc) -> (B, 3, d_llm)
        def __init__(self):
            super().__init__()
            self.net = nn.Linear(64, 3 * 32)

        def forward(self, feats):
            return self.net(feats.mean(1)).reshape(len(feats), 3, 32)

    image = tiny_mllm.branches["image"]
    model = MLLM(tiny_mllm.llm, tiny_mllm.tokenizer, {"image": Branch("image", image.encoder, Split(), n_tokens=3)})
    x = render("image", world, world.entities[2], "high", np.random.default_rng(0))
    batch = model.batch([chat("image : <image> what is this ?")], [{"image": [x]}])
    rows, cols = batch.slots["image"]
    assert cols.tolist() == [cols[0].item() + k for k in range(3)]
    assert (batch.input_ids[rows, cols] == PLACEHOLDER_ID).all() and (batch.routes[rows, cols] == 1).all()
    torch.testing.assert_close(model.embed(batch)[rows, cols], model.branches["image"].project(batch.feats["image"])[0])
    assert model(batch).logits.shape[:2] == batch.input_ids.shape
    bad = MLLM(tiny_mllm.llm, tiny_mllm.tokenizer, {"image": Branch("image", image.encoder, Split(), n_tokens=2)})
    with pytest.raises(ValueError, match=r"projector gave shape \(1, 3, 32\), expected \(B, 2, d_llm\)"):
        bad.embed(bad.batch([chat("image : <image> ?")], [{"image": [x]}]))
