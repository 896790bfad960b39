"""Bad input to composition, checkpoint loading and the MLLM's inputs: one clear line naming the culprit.

Each table holds one row per case: how to build or corrupt the input, and a fragment
of the message the error must carry.
"""

import copy
import json

import numpy as np
import pytest
import torch

from mckit.compose import static as compose
from mckit.models.checkpoints import CheckpointError, load_mllm, save_mllm
from mckit.models.mllm import MLLM, TOY_INPUT_SHAPE, Branch
from mckit.world.entities import MODALITIES
from mckit.world.render import render
from mckit.world.tasks import chat

NAN, INF = float("nan"), float("inf")


def _single(model, mod):
    """A single-modality model sharing ``model``'s LLM (so built on the same base)."""
    return MLLM(model.llm, model.tokenizer, {mod: model.branches[mod]})


def _tuned(model, mod, seed):
    """A single-modality model whose LLM moved away from ``model``'s (a non-zero task vector)."""
    llm = copy.deepcopy(model.llm)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in llm.named_parameters():
            if "layers" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    return MLLM(llm, model.tokenizer, {mod: model.branches[mod]})


# --------------------------------------------------------------------------- composition

#: (case, call(models, base), message fragment)
COMPOSE_CASES = [
    ("naivemc of an empty dict", lambda ms, base: compose.naivemc({}, base), "nothing to compose"),
    ("naivemc of an empty list", lambda ms, base: compose.naivemc([], base), "nothing to compose"),
    ("task arithmetic of nothing", lambda ms, base: compose.task_arithmetic_compose([], base, 0.5),
     "nothing to compose"),
    ("LoRA trap table of nothing", lambda ms, base: compose.lora_trap_table([], base), "nothing to compose"),
    ("dilution over zero models", lambda ms, base: compose.dilution_control(ms[0], base, 0),
     r"dilution control: n \(the number of composed models\) must be >= 1, got 0"),
    ("NaN coefficient", lambda ms, base: compose.task_arithmetic_compose(ms, base, NAN),
     "coefficient lam = nan is not a finite number"),
    ("infinite coefficient", lambda ms, base: compose.task_arithmetic_compose(ms, base, -INF),
     "coefficient lam = -inf is not a finite number"),
    ("numpy NaN coefficient", lambda ms, base: compose.task_arithmetic_compose(ms, base, np.float32("nan")),
     "coefficient lam = nan is not a finite number"),
    ("NaN in a list of coefficients", lambda ms, base: compose.task_arithmetic_compose(ms, base, [0.5, NAN]),
     r"coefficient lam\[1\] = nan is not a finite number"),
    ("coefficient given as text", lambda ms, base: compose.task_arithmetic_compose(ms, base, "0.5"),
     "coefficient lam = '0.5' is not a finite number"),
    ("too few coefficients", lambda ms, base: compose.task_arithmetic_compose(ms, base, [0.5]),
     "1 coefficients lam for 2 models"),
    ("NaN in merged_deltas' list", lambda ms, base: compose.merged_deltas(
        [compose.task_vector(m, base) for m in ms], [INF, 0.5]), r"coefficient lam\[0\] = inf is not a finite"),
    ("NaN in merged_deltas' number", lambda ms, base: compose.merged_deltas(
        [compose.task_vector(m, base) for m in ms], NAN), "coefficient lam = nan is not a finite"),
]


@pytest.mark.parametrize("call, fragment", [c[1:] for c in COMPOSE_CASES], ids=[c[0] for c in COMPOSE_CASES])
def test_bad_composition_is_named(tiny_mllm, call, fragment):
    models = [_tuned(tiny_mllm, "image", 1), _tuned(tiny_mllm, "audio", 2)]
    with pytest.raises(ValueError, match=fragment) as err:
        call(models, tiny_mllm.llm)
    assert "\n" not in str(err.value)


def test_valid_coefficients_still_compose(tiny_mllm):
    """One number, one per model, numpy numbers: the same model as before."""
    base = tiny_mllm.llm
    models = [_tuned(tiny_mllm, "image", 1), _tuned(tiny_mllm, "audio", 2)]
    ref = compose.naivemc(models, base).llm.state_dict()
    for lam in (0.5, [0.5, 0.5], np.float64(0.5), np.array([0.5, 0.5]), torch.tensor(0.5)):
        got = compose.task_arithmetic_compose(models, base, lam).llm.state_dict()
        assert all(torch.equal(ref[k], got[k]) for k in ref), lam
    single = compose.naivemc([_single(tiny_mllm, "image")], base)
    assert single.modalities == ["image"]


# --------------------------------------------------------------------------- checkpoints

def _meta(edit):
    def corrupt(folder):
        meta = json.loads((folder / "mllm.json").read_text())
        edit(meta)
        (folder / "mllm.json").write_text(json.dumps(meta))
    return corrupt


def _remove_tokenizer(folder):
    for f in (folder / "tokenizer").iterdir():
        f.unlink()
    (folder / "tokenizer").rmdir()


#: (case, corrupt(checkpoint folder), message fragment)
CHECKPOINT_CASES = [
    ("no llm entry", _meta(lambda m: m.pop("llm")), r"m/mllm\.json: no 'llm' entry"),
    ("llm entry not an object", _meta(lambda m: m.update(llm="llm")), r"m/mllm\.json: no 'llm' entry"),
    ("unknown llm kind", _meta(lambda m: m["llm"].update(kind="merged")),
     r"m/mllm\.json: 'llm' kind 'merged', expected one of \['base', 'decoupled', 'full', 'lora'\]"),
    ("full llm without path", _meta(lambda m: m["llm"].pop("path")),
     r"m/mllm\.json: 'llm' entry of kind 'full' needs a 'path' path"),
    ("no modalities", _meta(lambda m: m.pop("modalities")), r"m/mllm\.json: no 'modalities' entry"),
    ("modality without projector", _meta(lambda m: m["modalities"]["audio"].pop("projector")),
     r"m/mllm\.json: modality 'audio' needs a 'projector' type"),
    ("unknown projector", _meta(lambda m: m["modalities"]["image"].update(projector="resampler")),
     r"m/mllm\.json: unknown projector type 'resampler'"),
    ("unknown modality", _meta(lambda m: m["modalities"].update(smell={"projector": "mlp2x_gelu"})),
     r"m/mllm\.json: unknown modality 'smell'"),
    ("not an object", lambda f: (f / "mllm.json").write_text("[1, 2]"), r"m/mllm\.json: format \[1, 2\]"),
    ("no tokenizer folder", _remove_tokenizer, r"missing tokenizer folder .*m/tokenizer"),
    ("no tokenizer.json", lambda f: (f / "tokenizer" / "tokenizer.json").unlink(),
     r"no tokenizer\.json in the tokenizer folder .*m/tokenizer"),
    ("corrupt tokenizer.json", lambda f: (f / "tokenizer" / "tokenizer.json").write_text("{oops"),
     r"corrupt tokenizer .*m/tokenizer/tokenizer\.json"),
]


@pytest.mark.parametrize("corrupt, fragment", [c[1:] for c in CHECKPOINT_CASES], ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint_is_named(tiny_mllm, tmp_path, corrupt, fragment):
    save_mllm(tiny_mllm, tmp_path / "m")
    corrupt(tmp_path / "m")
    with pytest.raises(CheckpointError, match=fragment) as err:
        load_mllm(tmp_path / "m")
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------- inputs

def _rendered(world, mod, seed=0):
    return render(mod, world, world.entities[seed], "high", np.random.default_rng(seed))


def _nan_at(x, value=NAN):
    x = x.copy()
    x.flat[5] = value
    return x


def test_toy_input_shapes_are_the_renderers(world, tiny_mllm):
    for mod in MODALITIES:
        assert _rendered(world, mod).shape == TOY_INPUT_SHAPE[mod] == tiny_mllm.branches[mod].input_shape


#: (case, modality, make(world) -> a bad input placed as item 1's second input, message fragment)
INPUT_CASES = [
    ("small image", "image", lambda w: np.zeros((3, 8, 8), np.float32),
     r"item 1: image input 1 has shape \(3, 8, 8\), expected \(3, 16, 16\)"),
    ("image without channels", "image", lambda w: np.zeros((16, 16), np.float32),
     r"item 1: image input 1 has shape \(16, 16\), expected \(3, 16, 16\)"),
    ("audio with a batch axis", "audio", lambda w: np.zeros((1, 1024), np.float32),
     r"item 1: audio input 1 has shape \(1, 1024\), expected \(1024,\)"),
    ("short audio", "audio", lambda w: np.zeros(512, np.float32),
     r"item 1: audio input 1 has shape \(512,\), expected \(1024,\)"),
    ("video frames as an image", "video", lambda w: np.zeros((3, 16, 16), np.float32),
     r"item 1: video input 1 has shape \(3, 16, 16\), expected \(4, 16, 16\)"),
    ("point cloud without colour", "point", lambda w: np.zeros((128, 3), np.float32),
     r"item 1: point input 1 has shape \(128, 3\), expected \(128, 6\)"),
    ("NaN image", "image", lambda w: _nan_at(_rendered(w, "image")), "item 1: image input 1 contains NaN or inf"),
    ("NaN audio", "audio", lambda w: _nan_at(_rendered(w, "audio")), "item 1: audio input 1 contains NaN or inf"),
    ("infinite video", "video", lambda w: _nan_at(_rendered(w, "video"), INF),
     "item 1: video input 1 contains NaN or inf"),
    ("infinite point", "point", lambda w: _nan_at(_rendered(w, "point"), -INF),
     "item 1: point input 1 contains NaN or inf"),
    ("text as an image", "image", lambda w: "a cat", r"item 1: image input 1 is not a numeric array \(str\)"),
]


def _bad_batch(world, mod, bad):
    """Three items; item 1 holds a good input then ``bad``."""
    prompts = [chat(f"{mod} : <{mod}> ?"), chat(f"{mod} : <{mod}> {mod} : <{mod}> ?"), chat(f"{mod} : <{mod}> ?")]
    good = _rendered(world, mod, 1)
    return prompts, [{mod: [good]}, {mod: [good, bad]}, {mod: [good]}]


@pytest.mark.parametrize("mod, make, fragment", [c[1:] for c in INPUT_CASES], ids=[c[0] for c in INPUT_CASES])
@pytest.mark.parametrize("entry", ["encode_inputs", "batch"])
def test_bad_input_is_named(world, tiny_mllm, mod, make, fragment, entry):
    prompts, inputs = _bad_batch(world, mod, make(world))
    with pytest.raises(ValueError, match=fragment) as err:
        if entry == "batch":
            tiny_mllm.batch(prompts, inputs)
        else:
            tiny_mllm.encode_inputs(inputs)
    assert "\n" not in str(err.value)


def test_a_branch_without_input_shape_checks_agreement_and_nan(world, tiny_mllm):
    """``input_shape=None``: any shape is taken, but the batch must agree and be finite."""
    image = tiny_mllm.branches["image"]
    free = MLLM(tiny_mllm.llm, tiny_mllm.tokenizer, {"image": Branch("image", image.encoder, image.projector)})
    assert free.branches["image"].input_shape is None
    small = np.zeros((3, 8, 8), np.float32)
    assert len(free.encode_inputs([{"image": [small]}, {"image": [small]}])) == 2
    with pytest.raises(ValueError, match=r"item 1: image input 0 has shape \(3, 16, 16\), expected \(3, 8, 8\)"):
        free.encode_inputs([{"image": [small]}, {"image": [_rendered(world, "image")]}])
    with pytest.raises(ValueError, match="item 0: image input 0 contains NaN or inf"):
        free.encode_inputs([{"image": [_nan_at(small)]}])


def test_good_inputs_give_the_same_features(world, tiny_mllm):
    """The checks change nothing on valid input: features equal the encoder's own."""
    xs = [_rendered(world, "audio", i) for i in range(3)]
    feats = tiny_mllm.encode_inputs([{"audio": xs[:2]}, {}, {"audio": xs[2:]}])
    direct = tiny_mllm.branches["audio"].encode(torch.as_tensor(np.stack(xs)))
    torch.testing.assert_close(torch.stack(feats[0]["audio"] + feats[2]["audio"]), direct, rtol=0, atol=0)
    assert feats[1] == {"audio": []}
