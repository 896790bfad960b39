"""Benchmark: peak memory of `python -m mckit compose` on language models with real 7B layer shapes.

    .venv/bin/python bench/compose.py [--layers 2 4] [--method ties]
    .venv/bin/python bench/compose.py --method damc [--rank 128]

1. Writes (once, under bench/.work/compose) a plain Llama base with vicuna-7b's layer shapes (hidden 4096,
   intermediate 11008, 32 heads, vocab 32000) and N layers, and three sources on it in their real on-disk
   layout: LLaVA-1.5 (image), Video-LLaVA (image + video) and LLaVA-NeXT-Video, each the base plus seeded
   N(0, 0.002) noise, with the kit's tiny CLIP towers; every tensor bf16, written by ``save_pretrained``.
2. Composes them, each run in its own process started by a small launcher that takes the child's wall time
   and peak RSS (``os.wait4``), for every N in ``--layers``.
   ``--method damc``: decoupled sources instead (LLaVA-1.5 for images, Video-LLaVA for videos), whose language
   model is the base's, each with peft-named random text and modality LoRAs of ``--rank`` on the seven linears
   of every layer (float32, as peft saves them).
3. Prints the peak RSS against the goal (under 2 GiB whatever N) and the ratio between the largest and
   the smallest N (flat memory: close to 1).

Disk: about 1.4 GB per model and 2 layers, 0.8 GB more per 2 further layers; not part of `make test`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from merge import timed

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORK = HERE / ".work" / "compose"
SHAPES = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
              vocab_size=32000)
SOURCES = ("llava", "video_llava", "llava_next_video")
#: What each source gives the composed model (the third only its language model: both others give video).
ROLES = ("image", "video", "text")
GOAL_MIB = 2048


#: The seven linears of a decoder layer: (out, in) at vicuna-7b's shapes.
LINEAR_SHAPES = {**{f"self_attn.{p}_proj": (4096, 4096) for p in "qkvo"}, "mlp.gate_proj": (11008, 4096),
                 "mlp.up_proj": (11008, 4096), "mlp.down_proj": (4096, 11008)}


def _fill(model: torch.nn.Module, seed: int, noise_of: dict | None = None, noise: float = 0.002) -> dict:
    """Give an empty-initialised ``model`` N(0, 0.02) bf16 weights (norms 1), or ``noise_of`` + N(0, noise^2);
    returns {name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if noise_of is not None and name in noise_of:
            t = noise_of[name].float() + noise * torch.randn(p.shape, generator=g)
        elif p.dim() == 1:
            t = torch.ones(p.shape)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g)
        state[name] = t.to(torch.bfloat16)
    return state


def _save(model: torch.nn.Module, state: dict, out: Path) -> None:
    model.load_state_dict(state, strict=False, assign=True)
    model.save_pretrained(out, max_shard_size="1GB")


def write_adapters(out: Path, layers: int, modality: str, rank: int, seed: int) -> None:
    """Random text and ``modality`` LoRAs under peft's names for a LLaVA-family model (``out/adapters/{name}/``)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    for adapter in ("text", modality):
        tensors = {}
        for i in range(layers):
            for linear, (rows, cols) in LINEAR_SHAPES.items():
                key = f"base_model.model.model.language_model.layers.{i}.{linear}"
                tensors[f"{key}.lora_A.weight"] = 0.01 * torch.randn(rank, cols, generator=g)
                tensors[f"{key}.lora_B.weight"] = 0.01 * torch.randn(rows, rank, generator=g)
        folder = out / "adapters" / adapter
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": rank,
                                                                "lora_alpha": 2 * rank}) + "\n")


def make_models(root: Path, layers: int, decoupled_rank: int | None = None) -> tuple[Path, list[Path]]:
    """The base and the three sources with ``layers`` decoder layers of 7B shapes, written once
    (``decoupled_rank``: two decoupled sources, the base's language model + LoRAs of that rank)."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from mckit.models.tiny_real import BUILDERS, LLAMA_TEXT

    kinds = SOURCES[:2] if decoupled_rank else SOURCES
    base_dir, dirs = root / "base", [root / kind for kind in kinds]
    if all((d / "config.json").is_file() for d in (base_dir, *dirs)):
        return base_dir, dirs
    shutil.rmtree(root, ignore_errors=True)
    text = dict(LLAMA_TEXT, **SHAPES, num_hidden_layers=layers)
    text.pop("model_type")
    with init_empty_weights():
        base = LlamaForCausalLM(LlamaConfig(**text))
    base_state = _fill(base, 0)
    _save(base, base_state, base_dir)
    base_llm = {"model.language_model." + k[len("model."):] if k.startswith("model.") else k: v
                for k, v in base_state.items()}
    for i, (kind, out) in enumerate(zip(kinds, dirs), start=1):
        config = BUILDERS[kind]().config
        config.text_config.update(text)
        with init_empty_weights():
            model = type(BUILDERS[kind]())(config)
        _save(model, _fill(model, i, base_llm, 0.0 if decoupled_rank else 0.002), out)
        if decoupled_rank:
            write_adapters(out, layers, ROLES[i - 1], decoupled_rank, i)
        print(f"wrote {out.name} ({layers} layers)", flush=True)
    return base_dir, dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="decoder layers of each run")
    parser.add_argument("--method", default="ties", help="merging method (default ties, keep 0.2), or damc")
    parser.add_argument("--rank", type=int, default=128, help="LoRA rank of the decoupled sources (damc)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for layers in args.layers:
        damc = args.method == "damc"
        root = WORK / (f"layers{layers}-decoupled{args.rank}" if damc else f"layers{layers}")
        base, sources = make_models(root, layers, args.rank if damc else None)
        out = root / "composed"
        shutil.rmtree(out, ignore_errors=True)
        size = sum(f.stat().st_size for d in (base, *sources) for f in d.glob("*.safetensors")) / 1e9
        wall, rss = timed([sys.executable, "-m", "mckit", "compose", "--method", args.method, "--base", str(base),
                           "--sources", *(f"{s}:{r}" for s, r in zip(sources, ROLES)), "--out", str(out),
                           "--quiet"], env)
        results[layers] = {"wall_s": wall, "peak_rss_mib": rss, "input_gb": size}
        print(f"{layers} layers ({size:.1f} GB of inputs): {wall:.1f} s, peak RSS {rss:.0f} MiB "
              f"({rss / GOAL_MIB:.2f} of the 2 GiB goal)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    lo, hi = min(results), max(results)
    print(f"peak RSS {hi} layers / {lo} layers: {results[hi]['peak_rss_mib'] / results[lo]['peak_rss_mib']:.2f}")
    (HERE / ".work" / "compose.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
