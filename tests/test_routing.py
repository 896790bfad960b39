"""Per-token routing: RoutedLinear by hand, routed LLMs against merged ones, KV-cache generation on the text route."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mckit.compose.routed import routed_compose
from mckit.compose.static import add_deltas
from mckit.models.adapters import LLMAdapter, MRoPEAdapter
from mckit.models.mllm import MLLM
from mckit.models.routing import (
    LINEARS,
    DenseDelta,
    LowRankDelta,
    MaskedDelta,
    RoutedLinear,
    RouteState,
    naive_routed_forward,
    route_linears,
)
from mckit.world.render import render
from mckit.world.tasks import chat


def _linear(seed=0, d_in=4, d_out=3):
    torch.manual_seed(seed)
    return nn.Linear(d_in, d_out)


def test_two_routes_by_hand():
    base = _linear()
    dW = torch.arange(12, dtype=torch.float32).reshape(3, 4) / 10
    state = RouteState()
    layer = RoutedLinear(base, {1: DenseDelta(dW)}, state)
    x = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 1.0]]])          # (1, 3, 4)
    with state.active(torch.tensor([[0, 1, 0]])):
        y = layer(x)
    W, b = base.weight.detach(), base.bias.detach()
    expected = torch.stack([W[:, 0] + b, W[:, 1] + b + dW[:, 1], W[:, 2] + W[:, 3] + b])
    torch.testing.assert_close(y[0], expected)


@pytest.mark.parametrize("kind", ["dense", "low_rank", "masked"])
def test_delta_kinds_equal_their_dense_weight_and_the_naive_forward(kind):
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(2, 4, generator=g), torch.randn(3, 2, generator=g)
    W, m = torch.randn(3, 4, generator=g), (torch.rand(3, 4, generator=g) > 0.5).float()
    delta = {"dense": DenseDelta(W), "low_rank": LowRankDelta(A, B, 0.5), "masked": MaskedDelta(m, W)}[kind]
    dense = {"dense": W, "low_rank": 0.5 * B @ A, "masked": m * W}[kind]
    torch.testing.assert_close(delta.dense(), dense)
    state = RouteState()
    layer = RoutedLinear(_linear(), {2: delta, 0: DenseDelta(torch.randn(3, 4, generator=g))}, state)
    x, routes = torch.randn(2, 5, 4, generator=g), torch.tensor([[0, 2, 2, 1, 0], [2, 0, 1, 1, 2]])
    with state.active(routes):
        routed, naive = layer(x), naive_routed_forward(layer, x)
    torch.testing.assert_close(routed, naive)
    on_two = routes == 2
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(routed[on_two], (plain + x @ dense.T)[on_two])
    torch.testing.assert_close(routed[routes == 1], plain[routes == 1])            # route 1 has no delta


def test_routes_must_match_the_tokens():
    state = RouteState()
    layer = RoutedLinear(_linear(), {1: DenseDelta(torch.zeros(3, 4))}, state)
    with state.active(torch.zeros(1, 2, dtype=torch.long)), pytest.raises(ValueError, match="routes have shape"):
        layer(torch.zeros(1, 3, 4))


def _deltas(llm, scale=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{name}.weight": scale * torch.randn(module.weight.shape, generator=g)
            for name, module in llm.named_modules() if name.rsplit(".", 1)[-1] in LINEARS}


def _prompts(world, model):
    rng = np.random.default_rng(0)
    mods = model.modalities
    prompts = [chat(" ".join(f"{m} : <{m}> ." for m in mods) + " what is this ?"), chat("what is this ?"),
               chat(f"{mods[0]} : <{mods[0]}> what is it ?")]
    inputs = [{m: [render(m, world, world.entities[k], "high", rng)] for k, m in enumerate(mods)}, {},
              {mods[0]: [render(mods[0], world, world.entities[3], "low", rng)]}]
    return model.batch(prompts, inputs)


def test_route_linears_replaces_the_seven_linears_of_a_transformers_llm(tiny_mllm):
    llm = copy.deepcopy(tiny_mllm.llm)
    deltas = {name.removesuffix(".weight"): DenseDelta(d) for name, d in _deltas(llm).items()}
    routed = route_linears(llm, {1: deltas}, RouteState())
    assert len(routed) == 7 * llm.config.num_hidden_layers
    assert sum(isinstance(m, RoutedLinear) for m in llm.modules()) == len(routed)
    with pytest.raises(ValueError, match="no routable linear"):
        route_linears(llm, {1: {"model.layers.0.nothing": DenseDelta(torch.zeros(1, 1))}}, RouteState())


def test_one_delta_on_every_route_equals_the_merged_model(world, tiny_mllm):
    """The same delta on text and every modality route: logits and KV-cache greedy answers equal theta_0 + delta."""
    base = tiny_mllm.llm
    d = _deltas(base, scale=0.2)
    merged = MLLM(add_deltas(base, d), tiny_mllm.tokenizer, dict(tiny_mllm.branches)).eval()
    routed = MLLM(copy.deepcopy(base), tiny_mllm.tokenizer, dict(tiny_mllm.branches)).eval()
    per_route = {r: {n.removesuffix(".weight"): DenseDelta(t) for n, t in d.items()}
                 for r in (0, *routed.route_ids.values())}
    route_linears(routed.llm, per_route, routed.route_state)
    folded = routed_compose({m: MLLM(base, tiny_mllm.tokenizer, {m: b}) for m, b in tiny_mllm.branches.items()},
                            base, {"text": d, **{m: d for m in tiny_mllm.modalities}})
    assert not any(isinstance(m, RoutedLinear) for m in folded.modules())      # equal deltas fold into W
    batch = _prompts(world, merged)
    want = merged(batch).logits
    for model in (routed, folded):
        torch.testing.assert_close(model(batch).logits, want, atol=1e-5, rtol=1e-4)
        assert model.generate(batch, 6) == merged.generate(batch, 6)


def test_generated_tokens_take_the_text_route(world, tiny_mllm):
    """KV-cache decoding of a routed model equals recomputing the whole sequence with new positions on route 0."""
    base = tiny_mllm.llm
    sources = {m: MLLM(base, tiny_mllm.tokenizer, {m: b}) for m, b in tiny_mllm.branches.items()}
    model = routed_compose(sources, base, {"text": _deltas(base, 0.1, 1),
                                           **{m: _deltas(base, 0.3, 2 + i) for i, m in enumerate(sources)}})
    assert any(isinstance(m, RoutedLinear) for m in model.modules())
    batch = _prompts(world, model)
    eos = model.tokenizer.eos_token_id
    ids = batch.input_ids
    for _ in range(5):
        ids = torch.cat([ids, model(_extended(batch, ids)).logits[:, -1].argmax(-1)[:, None]], dim=1)
    new = ids[:, batch.input_ids.shape[1]:].tolist()
    expected = [model.tokenizer.decode(row[:row.index(eos) + 1] if eos in row else row,
                                       skip_special_tokens=True).strip() for row in new]
    assert model.generate(batch, 5) == expected


def _extended(batch, ids):
    """``batch`` over ``ids``: the new positions attended, one position further each, on the text route."""
    extra = ids.shape[1] - batch.input_ids.shape[1]
    mask = torch.cat([batch.attention_mask, torch.ones(len(ids), extra, dtype=torch.long)], dim=1)
    pos = torch.cat([batch.position_ids, batch.position_ids[:, -1:] + torch.arange(1, extra + 1)], dim=1)
    routes = torch.cat([batch.routes, torch.zeros(len(ids), extra, dtype=torch.long)], dim=1)
    return type(batch)(ids, mask, pos, None, batch.slots, batch.feats, routes)


def test_mrope_positions_follow_the_grid_and_text_resumes_after_it():
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    spans = [[("image", 2, 4)]]
    pos = MRoPEAdapter({"image": (1, 2, 2)}).position_ids(mask, spans)
    assert pos.shape == (3, 1, 8)
    assert pos[:, 0, 1].tolist() == [0, 0, 0]                                   # text before the image
    assert pos[:, 0, 2:6].T.tolist() == [[1, 1, 1], [1, 1, 2], [1, 2, 1], [1, 2, 2]]
    assert pos[:, 0, 6].tolist() == [3, 3, 3] and pos[:, 0, 7].tolist() == [4, 4, 4]
    text_only = MRoPEAdapter().position_ids(torch.tensor([[0, 0, 1, 1, 1]]), [[]])
    assert (text_only == LLMAdapter().position_ids(torch.tensor([[0, 0, 1, 1, 1]]), [[]])[None]).all()
    with pytest.raises(ValueError, match="does not hold"):
        MRoPEAdapter({"image": (2, 2, 2)}).position_ids(mask, spans)


def test_routed_composition_of_nothing_is_a_clear_error(tiny_mllm):
    from mckit.compose.routed import modality_routed

    for call in (lambda: modality_routed([], tiny_mllm.llm), lambda: routed_compose({}, tiny_mllm.llm, {})):
        with pytest.raises(ValueError, match="nothing to compose"):
            call()


def _many_routed(world, model, copies=4):
    """A batch where most rows lie on modality routes: every input of every modality, ``copies`` times."""
    rng = np.random.default_rng(1)
    mods = model.modalities
    prompt = chat(" ".join(f"<{m}>" for m in mods for _ in range(copies)) + " ?")
    inputs = {m: [render(m, world, world.entities[k + j], "high", rng) for j in range(copies)]
              for k, m in enumerate(mods)}
    return model.batch([prompt, prompt], [inputs, inputs])


@pytest.mark.parametrize("many", [False, True], ids=["few-routed", "most-routed"])
def test_grouped_routing_equals_the_additive_and_naive_forwards(world, tiny_mllm, many):
    """A merged routed model (each route's weight formed once): the grouped forward, its MLP run once per route
    on that route's rows, gives the logits of the additive and the naive forwards; below the grouped share
    the batch runs additively."""
    from mckit.models.routing import GROUPED_SHARE

    base = tiny_mllm.llm
    sources = {m: MLLM(base, tiny_mllm.tokenizer, {m: b}) for m, b in tiny_mllm.branches.items()}
    model = routed_compose(sources, base, {"text": _deltas(base, 0.1, 1),
                                           **{m: _deltas(base, 0.3, 2 + i) for i, m in enumerate(sources)}})
    batch = _many_routed(world, model) if many else _prompts(world, model)
    state = model.route_state
    seen = []
    gate = model.llm.model.layers[0].mlp.gate_proj
    gate.register_forward_pre_hook(lambda module, args: seen.append((state.single, args[0].shape[0])))
    with torch.no_grad():
        grouped = model(batch).logits
        with state.active(batch.routes):
            share = state.sorted().share
        assert (share >= GROUPED_SHARE) == many
        state.grouped = False
        additive = model(batch).logits
        original = RoutedLinear.forward
        RoutedLinear.forward = naive_routed_forward
        try:
            naive = model(batch).logits
        finally:
            RoutedLinear.forward, state.grouped = original, True
    torch.testing.assert_close(grouped, additive, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grouped, naive, atol=1e-5, rtol=1e-4)
    first_run = seen[:len(set(batch.routes.flatten().tolist()))] if many else seen[:1]
    if many:      # once per route, on that route's rows
        counts = torch.unique(batch.routes, return_counts=True)
        assert [(r, n) for r, n in first_run] == list(zip(*(t.tolist() for t in counts)))
    else:
        assert first_run[0][0] is None
    assert "model.layers.0.mlp.gate_proj.weight" in model.llm.state_dict()      # names unchanged
    assert not any(k.startswith("merged") or ".merged_" in k for k in model.llm.state_dict())
