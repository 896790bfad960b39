"""Tiny random checkpoints of the real MLLM classes, saved by ``save_pretrained`` in their real on-disk layout.

What the tests and notebook 07 compose when no real checkpoint is at hand: the weights are random, so they show
the mechanics (names, layouts, loading, routing, batching), never a result.

Two text backbones: a Llama ("vicuna") one shared by LLaVA, Video-LLaVA and LLaVA-NeXT-Video, and a Qwen2.5 one
shared by Qwen2.5-VL, the Omni thinker and Audio Flamingo 3; Qwen2-Audio sits on a different Qwen (wider), as
the real one sits on Qwen-7B. Seeded: each build gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

LLAMA_TEXT = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, pad_token_id=0)
MROPE = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
QWEN_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=320, max_position_embeddings=512, pad_token_id=0)
CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=14)
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                   fullatt_block_indexes=[1], window_size=28, patch_size=14, spatial_merge_size=2,
                   temporal_patch_size=2)
#: Qwen's special token ids, moved inside the tiny vocabulary (image, video, vision start, vision end).
QWEN_IDS = dict(image_token_id=300, video_token_id=301, vision_start_token_id=302, vision_end_token_id=303)
#: LLaVA-NeXT's anyres resolutions for the tiny 28-pixel CLIP tower (the real ones: 336 x 672, ..., 672 x 672).
ANYRES = [[28, 56], [56, 28], [56, 56]]
WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, num_mel_bins=16,
               max_source_positions=50)


def _llava():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    return LlavaForConditionalGeneration(LlavaConfig(text_config=LLAMA_TEXT, vision_config=CLIPVisionConfig(**CLIP)
                                                     .to_dict(), image_token_index=300))


def _video_llava():
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration
    return VideoLlavaForConditionalGeneration(VideoLlavaConfig(
        text_config=LLAMA_TEXT, vision_config=CLIPVisionConfig(**CLIP).to_dict(), image_token_index=300,
        video_token_index=301))


def _llava_next_video():
    from transformers import CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration
    return LlavaNextVideoForConditionalGeneration(LlavaNextVideoConfig(
        text_config=LLAMA_TEXT, vision_config=CLIPVisionConfig(**CLIP).to_dict(), image_token_index=300,
        video_token_index=301, image_grid_pinpoints=ANYRES))


def _qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(text_config=dict(QWEN_TEXT, rope_parameters=MROPE),
                                                               vision_config=QWEN_VISION, **QWEN_IDS))


def _qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
    return Qwen2VLForConditionalGeneration(Qwen2VLConfig(
        text_config=dict(QWEN_TEXT, rope_parameters=MROPE), **QWEN_IDS,
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2)))


def _omni_thinker():
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration
    return Qwen2_5OmniThinkerForConditionalGeneration(Qwen2_5OmniThinkerConfig(
        text_config=dict(QWEN_TEXT, rope_parameters=MROPE), vision_config=QWEN_VISION,
        audio_config=dict(WHISPER, output_dim=64, n_window=10), image_token_index=300, video_token_index=301,
        vision_start_token_id=302, vision_end_token_id=303, audio_token_index=304, audio_start_token_id=305,
        audio_end_token_id=306))


def _audio_flamingo():
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration
    return AudioFlamingo3ForConditionalGeneration(AudioFlamingo3Config(
        text_config=dict(QWEN_TEXT, model_type="qwen2"), audio_token_id=300,
        audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          num_mel_bins=16, max_source_positions=50)))


def _qwen2_audio():
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration
    return Qwen2AudioForConditionalGeneration(Qwen2AudioConfig(
        text_config=dict(QWEN_TEXT, model_type="qwen2", hidden_size=96), audio_config=WHISPER, audio_token_index=300))


BUILDERS = {"llava": _llava, "video_llava": _video_llava, "llava_next_video": _llava_next_video,
            "qwen2_vl": _qwen2_vl, "qwen2_5_vl": _qwen2_5_vl, "qwen2_5_omni_thinker": _omni_thinker,
            "audioflamingo3": _audio_flamingo, "qwen2_audio": _qwen2_audio}
#: Which sources share a language model.
LLAMA_BASED = ("llava", "video_llava", "llava_next_video")
QWEN25_BASED = ("qwen2_5_vl", "qwen2_5_omni_thinker", "audioflamingo3")


def build(kind: str, out: Path, seed: int = 0, base: torch.nn.Module | None = None, spread: float = 0.05):
    """Save a tiny random ``kind`` model to ``out`` (its real on-disk layout) and return the model. ``base``: a
    causal LM of :func:`build_base`; the model's language model is then a fine-tune of it, theta_0 + N(0, (spread
    std(theta_0))^2) per tensor (towers and projectors stay random), as the sources of a composition are;
    ``spread`` 0: the base's language model itself (a decoupled source, :func:`save_decoupled_adapters`)."""
    from mckit.models.families import family_of, llm_name

    torch.manual_seed(seed)
    model = BUILDERS[kind]().eval()
    if base is not None:
        family, start = family_of(model.config.to_dict()), base.state_dict()
        with torch.no_grad():
            for name, param in model.state_dict().items():
                theta_0 = start.get(llm_name(family, name) or "")
                if theta_0 is not None and theta_0.shape == param.shape:
                    param.copy_(theta_0 + spread * float(theta_0.float().std()) * torch.randn_like(theta_0))
    model.save_pretrained(out)
    return model


def save_decoupled_adapters(model, out: Path, modality: str, seed: int = 0, rank: int = 4):
    """Random text and ``modality`` LoRAs on the seven linears of ``model``'s language model (peft, B drawn
    N(0, 0.02^2) instead of peft's zero start), saved as a decoupled source's ``out/adapters/text/`` and
    ``out/adapters/{modality}/``; returns the peft model holding both (``model`` is wrapped in place)."""
    from peft import LoraConfig, get_peft_model

    from mckit.models.families import family_of, llm_name
    from mckit.models.routing import LINEARS

    family = family_of(model.config.to_dict())
    targets = [n for n, _ in model.named_modules()
               if n.rsplit(".", 1)[-1] in LINEARS and llm_name(family, n + ".weight") is not None]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    peft_model = get_peft_model(model, config, adapter_name="text")
    peft_model.add_adapter(modality, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(Path(out) / "adapters", selected_adapters=["text", modality])
    return peft_model


def word_tokenizer(vocab_size: int = 320):
    """A word-level tokenizer over ``w4`` .. ``w{vocab_size-1}`` (ids 4 ..) with <pad> 0, <unk> 1, <s> 2, </s> 3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def build_base(kind: str, out: Path, seed: int = 0):
    """A plain language model with the text config of ``kind``'s family (the base the sources share), saved with a
    word tokenizer; returns the model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    text = dict(LLAMA_TEXT) if kind in LLAMA_BASED else dict(QWEN_TEXT, model_type="qwen2")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text)).eval()
    model.save_pretrained(out)
    word_tokenizer().save_pretrained(out)
    return model


def save_clip_processor(folder: Path, side: int = 28) -> None:
    """The image processor of the tiny CLIP towers (``side`` x ``side`` crops), saved as the source saves its own."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    processor.save_pretrained(folder)


def save_whisper_extractor(folder: Path, mel_bins: int = 16, seconds: int = 1) -> None:
    """The log-mel extractor of the tiny audio towers (``seconds`` clips: 100 frames a second)."""
    from transformers import WhisperFeatureExtractor

    WhisperFeatureExtractor(feature_size=mel_bins, chunk_length=seconds).save_pretrained(folder)


def write_demo(root: Path, decoupled: bool = False) -> dict:
    """A base language model and two sources built on it (a LLaVA for images, a Video-LLaVA for videos), tiny and
    random, with their tokenizer and image processors: ``{"base": path, "sources": ["DIR:image", "DIR:video"]}``.
    ``decoupled``: the sources keep the base's language model and carry random text and modality LoRAs (DAMC's
    sources, :func:`save_decoupled_adapters`)."""
    root = Path(root)
    base = build_base("llava", root / "base")
    for seed, (kind, mod) in enumerate((("llava", "image"), ("video_llava", "video")), start=1):
        model = build(kind, root / kind, seed, base, spread=0.0 if decoupled else 0.05)
        if decoupled:
            save_decoupled_adapters(model, root / kind, mod, seed=seed)
        save_clip_processor(root / kind)
    return {"base": root / "base", "sources": [f"{root / 'llava'}:image", f"{root / 'video_llava'}:video"]}


def save_qwen_processor(folder: Path) -> None:
    """The image processor of the tiny Qwen-VL towers (patch 14, merge 2, temporal patch 2: Qwen2-VL's own), saved as
    the source saves its own; its PIL backend needs no torchvision."""
    from transformers import Qwen2VLImageProcessorPil

    Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2).save_pretrained(folder)


def save_anyres_processor(folder: Path, side: int = 28) -> None:
    """LLaVA-NeXT's image processor for the tiny CLIP towers (``side`` x ``side`` tiles at :data:`ANYRES`)."""
    from transformers import LlavaNextImageProcessorPil

    LlavaNextImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                               image_grid_pinpoints=ANYRES).save_pretrained(folder)
