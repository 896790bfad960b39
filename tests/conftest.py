import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the tests' models are tiny, and two threads wait for each other whenever another process takes a
# core mid-run (with a job started on one of two cores after pytest, test_merge_bench took 15 min instead of 20 s).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def world():
    from mckit.world.entities import make_world

    return make_world(0)


@pytest.fixture(scope="session")
def tokenizer(world):
    from mckit.world.tasks import corpus_words
    from mckit.world.tokenizer import train_tokenizer

    return train_tokenizer(corpus_words(world))


@pytest.fixture()
def tiny_mllm(tokenizer):
    """A random tiny MLLM with all four branches (hidden 32, 2 layers)."""
    from mckit.models.mllm import MLLM, toy_branch
    from mckit.models.training import make_llm
    from mckit.world.entities import MODALITIES

    llm = make_llm(tokenizer, hidden=32, layers=2, heads=2, intermediate=64, seed=0).eval()
    return MLLM(llm, tokenizer, {m: toy_branch(m, 32) for m in MODALITIES}).eval()


@pytest.fixture(scope="session")
def bench(tmp_path_factory, world):
    """A small benchmark in MCUB's schema (40 test / 12 val items per split, 8 single items)."""
    from mckit.eval.mcub import build_benchmark

    root = tmp_path_factory.mktemp("mcub") / "mcub"
    build_benchmark(root, world, n_test=40, n_val=12, n_single=8)
    return root
