"""The kit's tiny real-layout checkpoints and MCUB set, as the tests use them."""

from mckit.eval.mcub_demo import write_mcub  # noqa: F401
from mckit.models.tiny_real import (  # noqa: F401
    BUILDERS,
    LLAMA_BASED,
    QWEN25_BASED,
    build,
    build_base,
    save_anyres_processor,
    save_clip_processor,
    save_qwen_processor,
    save_whisper_extractor,
    word_tokenizer,
)


def evaluate_twice(folder, root):
    """A real-layout MCUB set written under ``root`` (3 MCUB-4 items) and the composed ``folder``'s results on
    it, batched (3 a batch) and one by one: ``(items, batched, alone)``."""
    from mckit.compose.checkpoints import composed_preprocessors, load_composed
    from mckit.eval.mcub_reader import load_split
    from mckit.eval.real import evaluate_real

    write_mcub(root)
    items = load_split(root / "MCUB-4.json", root / "MCUB-answer.json", root)
    model, preprocess = load_composed(folder), composed_preprocessors(folder)
    batched = evaluate_real(model, items, preprocess, batch_size=3, max_new_tokens=3, progress=False)
    alone = evaluate_real(model, items, preprocess, batch_size=1, max_new_tokens=3, progress=False)
    return items, batched, alone


def routed_and_plain(model):
    """Logits of one seeded image prompt through the composed ``model``, routed and with every route off (the
    language model's shared weights alone): ``(routed, plain)``."""
    import torch

    torch.manual_seed(0)
    x = torch.randn(1, *model.branches["image"].input_shape)
    batch = model.batch(["w5 <image> w9"], [{"image": [x[0]]}])
    with torch.no_grad():
        routed = model(batch).logits
        with model.route_state.active(None):
            plain = model.llm(inputs_embeds=model.embed(batch), attention_mask=batch.attention_mask).logits
    return routed, plain
