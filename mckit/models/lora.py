"""LoRA through ``peft``: add adapters to an MLLM's LLM, tell whether an LLM has them, list them, fold them.

The one test of "is this LLM a LoRA model" in the kit is :func:`is_lora`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

from peft import PeftModel
from torch import nn

#: peft's adapter name (the kit uses one adapter per model).
ADAPTER = "default"
#: Prefix peft puts before the wrapped model's module names.
PEFT_PREFIX = "base_model.model."


def is_lora(llm: nn.Module) -> bool:
    """Whether ``llm`` is a ``peft`` model (LoRA adapters over a plain causal LM)."""
    return isinstance(llm, PeftModel)


def plain_llm(llm: nn.Module) -> nn.Module:
    """The plain causal LM under the adapters (itself if ``llm`` has none); shares its weights."""
    return llm.get_base_model() if is_lora(llm) else llm


def lora_layers(llm: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(weight name in the plain LLM, e.g. ``model.layers.0.self_attn.q_proj.weight``; peft LoRA layer)."""
    if not is_lora(llm):
        return
    for name, module in llm.named_modules():
        if hasattr(module, "lora_A") and ADAPTER in module.lora_A:
            yield name.removeprefix(PEFT_PREFIX) + ".weight", module


def is_lora_parameter(name: str) -> bool:
    """Whether parameter ``name`` of a peft model is a LoRA factor (A or B)."""
    return ".lora_A." in name or ".lora_B." in name


def folded(llm: nn.Module) -> nn.Module:
    """``llm`` with its LoRA updates added into the weights (a plain LLM); ``llm`` itself if it has none.

    Consumes the peft wrapper: pass a copy to keep the original.
    """
    return llm.merge_and_unload() if is_lora(llm) else llm


@contextlib.contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence one FutureWarning peft triggers in transformers 5 (``is_gradient_checkpointing`` is deprecated)
    when it wraps a model: nothing a user of the kit can act on. Only that warning, only in this block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield
