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
