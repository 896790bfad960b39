"""Benchmark: the cost of per-token routing in the LLM's forward pass.

    .venv/bin/python bench/routing.py [--system modality_routed|damc|mmer] [--batch 128] [--repeat 30] [--threads N]

On one input (the first ``--batch`` MCUB-4 test prompts of the shipped toy
world, each with its four inputs, as the letter protocol batches them) it
times three composed 4-modality models:

- plain:  one weight for every token, no routing (one matmul per linear): NaiveMC,
  theta_0 + mean_i tau_i, over the LoRA models (``--system damc``: theta_0 + the
  merged text LoRAs, with the decoupled models' branches, so the batch is the same; ``--system mmer``:
  theta_0 + tau*, the TIES-merged task vector of the full fine-tunes);
- routed: ``modality_routed``: text on NaiveMC's weights, each modality's tokens on its
  own model's (:func:`mckit.compose.routed.modality_routed`); ``damc``: DAMC over the
  decoupled models (:func:`mckit.compose.damc.damc`, 11 positions per input); ``mmer``: MMER's
  expansion (:func:`mckit.compose.mmer.expand`: W0 + m_i tau* per modality, the mean mask for text).
  RoutedLinear groups the tokens of each route and runs each group once;
- naive:  the same routed model, but every route's delta runs over the whole
  sequence and is then masked (:func:`mckit.models.routing.naive_routed_forward`).

The three are timed in turn, ``--repeat`` rounds, after a warm-up; medians are
reported. It also checks that the routed and naive forwards agree. The last
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

    def run(model, forward=fast_forward):
        RoutedLinear.forward = forward
        try:
            with torch.no_grad():
                start = time.perf_counter()
                logits = model(batch).logits
                return time.perf_counter() - start, logits
        finally:
            RoutedLinear.forward = fast_forward

    _, routed_logits = run(routed)
    _, naive_logits = run(routed, naive_forward)
    agree = torch.allclose(routed_logits, naive_logits, atol=1e-4, rtol=1e-4)
    print(f"routed and naive logits agree: {agree} (max |diff| {float((routed_logits - naive_logits).abs().max()):.2e})")
    times: dict[str, list[float]] = {"plain": [], "routed": [], "naive": []}
    for _ in range(3):
        run(plain), run(routed), run(routed, naive_forward)
    for _ in range(args.repeat):
        times["plain"].append(run(plain)[0])
        times["routed"].append(run(routed)[0])
        times["naive"].append(run(routed, naive_forward)[0])
    median = {k: statistics.median(v) for k, v in times.items()}
    for name, value in median.items():
        print(f"{name:>6}: {1000 * value:8.2f} ms (median of {args.repeat}; best {1000 * min(times[name]):.2f})")
    print(f"naive/plain = {median['naive'] / median['plain']:.2f}")
    print(f"routed/plain = {median['routed'] / median['plain']:.2f}")


if __name__ == "__main__":
    main()
