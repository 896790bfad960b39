"""A word-level tokenizer trained offline with ``tokenizers`` on the world's text."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}


def train_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Train a WordLevel tokenizer (whitespace split) whose vocabulary is ``words`` + specials.

    Every generated sentence separates words and punctuation by spaces, so a
    whitespace split is exact; placeholders like ``<image>`` never reach it.
    """
    tok = Tokenizer(models.WordLevel(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordLevelTrainer(special_tokens=list(SPECIAL.values()), min_frequency=1)
    tok.train_from_iterator([" ".join(words)], trainer=trainer)
    ids = sorted(tok.get_vocab().values())
    if ids != list(range(len(ids))):
        raise ValueError("tokenizer ids are not contiguous; do not pass special tokens in `words`")
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left", **SPECIAL)
