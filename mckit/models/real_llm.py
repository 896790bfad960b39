"""A real checkpoint's language model as a plain causal LM, under the toy models' names.

:func:`load_text_llm` reads only the language model's tensors of a checkpoint
folder (any family of :mod:`mckit.models.families`, on-disk layout), renames
them to ``model.*`` + ``lm_head.weight`` and loads them strictly into the
causal LM of its text config: ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` for
1-D families, :class:`MRoPECausalLM` for Qwen's 3-D rotary ones (transformers
has a text model for them but no causal LM). The towers are never read.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

from mckit.models.families import FamilyError, family_of, llm_names, read_config, text_config
from mckit.models.real_branches import open_checkpoint, read_tensors

#: Text model classes that ``AutoModel`` does not map from their text config's ``model_type``.
TEXT_MODELS = {"qwen2_5_omni_text": "Qwen2_5OmniThinkerTextModel"}


class MRoPECausalLM(nn.Module):
    """Qwen-VL's text model (3-D rotary positions, ``position_ids`` (3, B, L)) and its output head, with a
    causal LM's names (``model.*``, ``lm_head.weight``) and call (``inputs_embeds``, ``labels``, cache)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        known = TEXT_MODELS.get(config.model_type)
        self.model = getattr(transformers, known)(config) if known else AutoModel.from_config(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, position_ids=None, labels=None,
                past_key_values=None, use_cache: bool = False, **_) -> CausalLMOutputWithPast:
        out = self.model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values, use_cache=use_cache)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                               ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)


def causal_lm(text: dict, mrope: bool) -> nn.Module:
    """A causal LM (random weights) for the text config dict ``text``; ``mrope``: Qwen's 3-D rotary positions."""
    text = dict(text)
    cfg = AutoConfig.for_model(text.pop("model_type"), **text)
    return MRoPECausalLM(cfg) if mrope else AutoModelForCausalLM.from_config(cfg)


def text_llm_from_config(config: dict) -> nn.Module:
    """A causal LM (random weights) for a multimodal checkpoint's ``config`` dict."""
    return causal_lm(text_config(config), family_of(config).positions == "mrope")


def read_llm_state(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The language model's tensors of checkpoint folder ``path`` under causal-LM names, read shard by shard with
    ``safe_open`` (no tower tensor is read); ``dtype``: cast on reading (None keeps the stored one)."""
    path = Path(path)
    config = read_config(path)
    ckpt = open_checkpoint(path)
    names = llm_names(family_of(config, path), ckpt.names)
    if not names:
        raise FamilyError(f"{path}: no language-model tensor found (model_type {config.get('model_type')!r})")
    tensors = read_tensors(ckpt, names.values())
    return {mapped: tensors[name] if dtype is None else tensors[name].to(dtype) for mapped, name in names.items()}


def load_text_llm(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """The language model of checkpoint folder ``path`` as a causal LM, loaded strictly (a missing or extra tensor
    is an error naming it); tied embeddings are tied when the checkpoint stores no ``lm_head``."""
    config = read_config(path)
    state = read_llm_state(path, dtype)
    with init_empty_weights():                                   # no random init: every tensor comes from disk
        llm = text_llm_from_config(config)
    tied = bool(text_config(config).get("tie_word_embeddings", config.get("tie_word_embeddings", False)))
    if "lm_head.weight" not in state and tied:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    expected = set(llm.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise FamilyError(f"{path}: its language model does not load strictly ({what}; {len(missing)} missing, "
                          f"{len(extra)} unexpected)")
    llm.load_state_dict(state, strict=True, assign=True)
    if dtype is not None:
        llm.to(dtype)
    return llm.eval()
