"""Real checkpoint families: where each keeps its language model, towers and projectors, on disk and in memory.

A family is named by its config's ``model_type``. The kit reads a source's
language model by the names a plain causal LM gives it, relative to the
decoder body (``model.layers.0.self_attn.q_proj.weight``, ``model.norm.weight``,
``lm_head.weight``): the names of the toy world's models, so every merging
method, MMER and DAMC run unchanged on real sources.

``save_pretrained`` in transformers 5 writes older layouts than the classes
use in memory: ``language_model.model.*`` + ``language_model.lm_head.weight``
(the LLaVA family, Qwen2-Audio, Audio Flamingo 3), ``model.*`` + ``lm_head`` +
``visual.*`` (Qwen2-VL, Qwen2.5-VL, the Omni thinker saved alone), ``thinker.*``
(the whole Qwen2.5-Omni). In memory every class holds
``model.language_model.*`` + ``lm_head.weight``. :func:`llm_name` maps any of
these to the causal LM's name, and nothing else (towers, projectors,
``talker.*``) to None.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class FamilyError(ValueError):
    """A checkpoint the kit cannot read as a known family, or sources that do not share a language model."""


@dataclass(frozen=True)
class Family:
    """What the kit needs to know of one ``model_type``.

    ``llm_prefixes``: prefixes of the decoder body, on disk (first) and in memory, each mapped to ``model.``;
    ``head``: the names of the output projection, mapped to ``lm_head.weight``; ``towers``: per modality,
    the prefixes (on disk) of the tower and projector that turn one input into LLM embeddings;
    ``positions``: ``"1d"`` or ``"mrope"`` (Qwen's 3-D rotary index).
    """

    model_type: str
    cls: str
    llm_prefixes: tuple[str, ...]
    head: tuple[str, ...]
    towers: dict[str, tuple[str, ...]]
    positions: str = "1d"


_LLAVA_LLM = ("language_model.model.", "model.language_model.")
_LLAVA_HEAD = ("language_model.lm_head.weight", "lm_head.weight")
_QWEN_LLM = ("model.", "model.language_model.")
_QWEN_HEAD = ("lm_head.weight",)

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llava", "LlavaForConditionalGeneration", _LLAVA_LLM, _LLAVA_HEAD,
           {"image": ("vision_tower.", "multi_modal_projector.")}),
    Family("video_llava", "VideoLlavaForConditionalGeneration", _LLAVA_LLM, _LLAVA_HEAD,
           {"image": ("image_tower.", "multi_modal_projector."), "video": ("video_tower.", "multi_modal_projector.")}),
    Family("llava_next_video", "LlavaNextVideoForConditionalGeneration", _LLAVA_LLM, _LLAVA_HEAD,
           {"video": ("vision_tower.", "multi_modal_projector."),
            "image": ("vision_tower.", "multi_modal_projector.", "image_newline")}),
    Family("qwen2_audio", "Qwen2AudioForConditionalGeneration", _LLAVA_LLM, _LLAVA_HEAD,
           {"audio": ("audio_tower.", "multi_modal_projector.")}),
    Family("audioflamingo3", "AudioFlamingo3ForConditionalGeneration", _LLAVA_LLM, _LLAVA_HEAD,
           {"audio": ("audio_tower.", "multi_modal_projector.")}),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", _QWEN_LLM, _QWEN_HEAD, {"image": ("visual.",),
           "video": ("visual.",)}, "mrope"),
    Family("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", _QWEN_LLM, _QWEN_HEAD, {"image": ("visual.",),
           "video": ("visual.",)}, "mrope"),
    Family("qwen2_5_omni_thinker", "Qwen2_5OmniThinkerForConditionalGeneration", _QWEN_LLM, _QWEN_HEAD,
           {"image": ("visual.",), "video": ("visual.",), "audio": ("audio_tower.",)}, "mrope"),
    Family("qwen2_5_omni", "Qwen2_5OmniForConditionalGeneration", ("thinker.model.",), ("thinker.lm_head.weight",),
           {"image": ("thinker.visual.",), "video": ("thinker.visual.",), "audio": ("thinker.audio_tower.",)},
           "mrope"),
)}

#: First names under a decoder-body prefix that are not the language model (``model.visual.*`` in memory).
_NOT_LLM = frozenset({"visual", "audio_tower", "vision_tower", "image_tower", "video_tower", "multi_modal_projector",
                      "image_newline", "language_model"})
#: The text config fields two language models must share to be merged.
TEXT_SHAPE = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "vocab_size")


def supported() -> str:
    return ", ".join(sorted(FAMILIES))


def read_config(path: str | Path) -> dict:
    """``config.json`` of a checkpoint folder; a missing or unreadable one is a :class:`FamilyError` naming it."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FamilyError(f"{file}: not found (a checkpoint folder holds config.json beside its safetensors)")
    try:
        config = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise FamilyError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(config, dict):
        raise FamilyError(f"{file}: not a JSON object")
    return config


def family_of(config: dict, source: str | Path = "checkpoint") -> Family:
    """The :class:`Family` of a config (by ``model_type``); an unknown one is an error listing the known ones."""
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise FamilyError(f"{source}: model_type {model_type!r} is not a family the kit knows; supported: "
                          f"{supported()}")
    return FAMILIES[model_type]


def text_config(config: dict) -> dict:
    """The language model's config inside a multimodal one (``text_config``; the Omni model's thinker's); a plain
    language model's config is its own."""
    if "text_config" not in config and "thinker_config" not in config and config.get("model_type") in ARCHITECTURES:
        return config                                            # a plain language model (the base)
    inner = config.get("thinker_config", config)
    text = inner.get("text_config")
    if not isinstance(text, dict):
        raise FamilyError(f"model_type {config.get('model_type')!r}: no text_config in its config")
    return text


def llm_name(family: Family, name: str) -> str | None:
    """The causal LM's name of checkpoint tensor ``name`` (``model.layers.0.mlp.up_proj.weight``,
    ``lm_head.weight``), on disk or in memory; None for anything that is not the language model."""
    if name in family.head:
        return "lm_head.weight"
    for prefix in sorted(family.llm_prefixes, key=len, reverse=True):
        if name.startswith(prefix):
            rest = name[len(prefix):]
            return None if rest.split(".", 1)[0] in _NOT_LLM else "model." + rest
    return None


def llm_names(family: Family, names) -> dict[str, str]:
    """{causal-LM name: checkpoint name} of every language-model tensor among ``names``; a name reached twice
    (both layouts in one checkpoint) is an error."""
    out: dict[str, str] = {}
    for name in names:
        mapped = llm_name(family, name)
        if mapped is None:
            continue
        if mapped in out:
            raise FamilyError(f"{family.model_type}: tensors {out[mapped]} and {name} are both the language "
                              f"model's {mapped}")
        out[mapped] = name
    return out


#: The decoder architecture of each text config's ``model_type`` (Qwen-VL's and Omni's text models are Qwen2's).
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen2_vl_text": "qwen2", "qwen2_5_vl_text": "qwen2",
                 "qwen2_5_omni_text": "qwen2"}


def text_signature(config: dict) -> dict:
    """The decoder ``architecture`` and the fields of :data:`TEXT_SHAPE` of a checkpoint's language model (a
    missing one reads as None)."""
    text = text_config(config)
    kind = text.get("model_type")
    return {"architecture": ARCHITECTURES.get(kind, kind), **{k: text.get(k) for k in TEXT_SHAPE}}


def check_same_text_base(configs: dict[str, dict]) -> None:
    """Every source's language model has the first one's shape and vocabulary, or a :class:`FamilyError`
    names the source and the fields that differ."""
    (first, ref), *rest = [(src, text_signature(c)) for src, c in configs.items()]
    for source, sig in rest:
        diff = {k: (v, ref[k]) for k, v in sig.items() if v != ref[k]}
        if diff:
            shown = ", ".join(f"{k} {a} (vs {b})" for k, (a, b) in diff.items())
            raise FamilyError(f"{source}: its language model differs from {first}'s: {shown}; models built on "
                              "different LLMs cannot be merged")
