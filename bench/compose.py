"""Benchmark: peak memory of `python -m mckit compose` on language models with real 7B layer shapes.

    .venv/bin/python bench/compose.py [--layers 2 4] [--method ties]

1. Writes (once, under bench/.work/compose) a plain Llama base with vicuna-7b's layer shapes (hidden 4096,
   intermediate 11008, 32 heads, vocab 32000) and N layers, and three sources on it in their real on-disk
   layout: LLaVA-1.5 (image), Video-LLaVA (image + video) and LLaVA-NeXT-Video, each the base plus seeded
   N(0, 0.002) noise, with the kit's tiny CLIP towers; every tensor bf16, written by ``save_pretrained``.
2. Composes them, each run in its own process started by a small launcher that takes the child's wall time
   and peak RSS (``os.wait4``), for every N in ``--layers``.
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


def _fill(model: torch.nn.Module, seed: int, noise_of: dict | None = None) -> dict:
    """Give an empty-initialised ``model`` N(0, 0.02) bf16 weights (norms 1), or ``noise_of`` + N(0, 0.002);
    returns {name: tensor}."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in model.state_dict().items():
        if noise_of is not None and name in noise_of:
            t = noise_of[name].float() + 0.002 * torch.randn(p.shape, generator=g)
        elif p.dim() == 1:
            t = torch.ones(p.shape)
        else:
            t = 0.02 * torch.randn(p.shape, generator=g)
        state[name] = t.to(torch.bfloat16)
    return state


def _save(model: torch.nn.Module, state: dict, out: Path) -> None:
    model.load_state_dict(state, strict=False, assign=True)
    model.save_pretrained(out, max_shard_size="1GB")


def make_models(root: Path, layers: int) -> tuple[Path, list[Path]]:
    """The base and the three sources with ``layers`` decoder layers of 7B shapes, written once."""
    from accelerate import init_empty_weights
    from transformers import LlamaConfig, LlamaForCausalLM

    from mckit.models.tiny_real import BUILDERS, LLAMA_TEXT

    base_dir, dirs = root / "base", [root / kind for kind in SOURCES]
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
    for i, (kind, out) in enumerate(zip(SOURCES, dirs), start=1):
        config = BUILDERS[kind]().config
        config.text_config.update(text)
        with init_empty_weights():
            model = type(BUILDERS[kind]())(config)
        _save(model, _fill(model, i, base_llm), out)
        print(f"wrote {out.name} ({layers} layers)", flush=True)
    return base_dir, dirs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4], help="decoder layers of each run")
    parser.add_argument("--method", default="ties", help="merging method (default ties, keep 0.2)")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {}
    for layers in args.layers:
        root = WORK / f"layers{layers}"
        base, sources = make_models(root, layers)
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
