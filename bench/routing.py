"""Benchmark: the cost of per-token routing in the LLM's forward pass.

    .venv/bin/python bench/routing.py [--system modality_routed|damc|mmer] [--batch 128] [--repeat 30] [--threads N]

On one input (the first ``--batch`` MCUB-4 test prompts of the shipped toy
world, each with its four inputs, as the letter protocol batches them) it
times four forward passes of composed 4-modality models:

- plain:  one weight for every token, no routing (one matmul per linear): NaiveMC,
  theta_0 + mean_i tau_i, over the LoRA models (``--system damc``: theta_0 + the
  merged text LoRAs, with the decoupled models' branches, so the batch is the same; ``--system mmer``:
  theta_0 + tau*, the TIES-merged task vector of the full fine-tunes);
- routed: ``modality_routed``: text on NaiveMC's weights, each modality's tokens on its
  own model's (:func:`mckit.compose.routed.modality_routed`); ``damc``: DAMC over the
  decoupled models (:func:`mckit.compose.damc.damc`, 11 positions per input); ``mmer``: MMER's
  expansion (:func:`mckit.compose.mmer.expand`: W0 + m_i tau* per modality, the mean mask for text).
  grouped: each route's weight W + dW_r formed once, rows sorted by route, one matmul per
  route, the MLP grouped as a whole (:mod:`mckit.models.routing`);
- additive: the same routed model run the other way: the shared weight over every token, then
  each route's delta over its own tokens (``RouteState.grouped = False``);
- naive:  the same routed model, but every route's delta runs over the whole
  sequence and is then masked (:func:`mckit.models.routing.naive_routed_forward`).

The four are timed in turn, ``--repeat`` rounds, after a warm-up; medians are
reported. It also checks that the routed, additive and naive forwards agree. The last
line is ``routed/plain = X.XX`` (goal: <= 1.25).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mckit.compose import mmer
from mckit.compose.damc import damc, model_deltas, text_deltas
from mckit.compose.routed import modality_routed
from mckit.compose.static import add_deltas, naivemc, with_llm
from mckit.eval.mcub import SPLITS, load_benchmark
from mckit.eval.protocols import item_inputs
from mckit.models.routing import RoutedLinear, naive_routed_forward
from mckit.models.shipped import load_base, load_model


def composed(system: str):
    """(plain, routed) four-modality models of ``system``; plain takes the batch of routed unrouted."""
    base = load_base()
    mods = SPLITS["MCUB-4"]
    if system == "damc":
        sources = {m: load_model(m, "decoupled") for m in mods}
        text = text_deltas(model_deltas(sources), base, [1 / len(mods)] * len(mods))
        return with_llm(add_deltas(base, text), sources), damc(sources, base)
    if system == "mmer":
        sources = {m: load_model(m, "full") for m in mods}
        masks = mmer.mmer_masks(sources, base)
        return with_llm(add_deltas(base, masks.tau_star), sources), mmer.expand(sources, base, masks)
    sources = {m: load_model(m, "lora") for m in mods}
    return naivemc(sources, base), modality_routed(sources, base)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="prompts per forward (evaluation's batch size)")
    parser.add_argument("--repeat", type=int, default=30, help="timed rounds (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--system", default="modality_routed", choices=["modality_routed", "damc", "mmer"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    plain, routed = composed(args.system)
    items = load_benchmark("MCUB-4", "test")[:args.batch]
    batch = plain.batch(*item_inputs(plain, items))
    n_routed = sum(isinstance(m, RoutedLinear) for m in routed.modules())
    tokens = int(batch.attention_mask.sum())
    on_modalities = int((batch.routes > 0).sum())
    print(f"batch {tuple(batch.input_ids.shape)}, {tokens} tokens, {on_modalities} on modality routes; "
          f"{n_routed} routed linears; torch threads {torch.get_num_threads()}")

    naive_forward = lambda layer, x: naive_routed_forward(layer, x)  # noqa: E731
    fast_forward = RoutedLinear.forward

    def run(model, forward=fast_forward, grouped=True):
        RoutedLinear.forward, model.route_state.grouped = forward, grouped
        try:
            with torch.no_grad():
                start = time.perf_counter()
                logits = model(batch).logits
                return time.perf_counter() - start, logits
        finally:
            RoutedLinear.forward, model.route_state.grouped = fast_forward, True

    ways = {"plain": lambda: run(plain), "routed": lambda: run(routed),
            "additive": lambda: run(routed, grouped=False), "naive": lambda: run(routed, naive_forward, False)}
    logits = {name: way()[1] for name, way in ways.items() if name != "plain"}
    for name in ("additive", "naive"):
        diff = float((logits["routed"] - logits[name]).abs().max())
        agree = torch.allclose(logits["routed"], logits[name], atol=1e-4, rtol=1e-4)
        print(f"routed and {name} logits agree: {agree} (max |diff| {diff:.2e})")
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(3):
        for way in ways.values():
            way()
    for _ in range(args.repeat):
        for name, way in ways.items():
            times[name].append(way()[0])
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, value in median.items():
        print(f"{name:>8}: {1000 * value:8.2f} ms (median of {args.repeat}; best {1000 * min(times[name]):.2f})")
    print(f"naive/plain = {median['naive'] / median['plain']:.2f}")
    print(f"additive/plain = {median['additive'] / median['plain']:.2f}")
    print(f"routed/plain = {median['routed'] / median['plain']:.2f}")


if __name__ == "__main__":
    main()
