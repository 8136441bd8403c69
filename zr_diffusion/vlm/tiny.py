"""Tiny offline models of the real Qwen-VL classes, built from config (no hub access).

``make_tiny_vlm(out_dir, family)`` writes a folder that loads through the same ``from_pretrained``
call as a real checkpoint: the real ``*ForConditionalGeneration`` class with a few-layer config, the
real processor class with the real image processor, and a byte-level BPE tokenizer trained locally on
the rubric texts so that the scoring prompts are short and every digit is one token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

from zr_diffusion.rubric import DIMENSIONS, SCORE_MARKER, student_instruction, teacher_instruction
from zr_diffusion.scores import ScoreGrid

FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
SIZES: tuple[str, ...] = ("tiny", "small")

# The special tokens of the Qwen-VL tokenizers, in the real checkpoints' order.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen-style chat template: image parts become <|vision_start|><|image_pad|><|vision_end|>; the
# processor expands the single <|image_pad|> to one pad token per merged vision token.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

_PROMPT_WORDS = (
    "a an the one two three four five six several many of and with on in under above below beside "
    "next to left right behind front top bottom center middle corner near far small large big tiny "
    "bright dark light red green blue yellow orange purple pink brown black white gray grey cyan "
    "circle square triangle star ring cross disc box cube sphere cone stripe line dot shape shapes "
    "cat dog bird fish horse car bus tree house flower apple banana cup chair table book lamp clock "
    "sky sea grass road mountain city portrait photo painting sketch scene background foreground "
    "The image shows I see there is are it its this that looks appears clean sharp blurry noisy "
    "smeared broken floating fused whole missing wrong correct matches mismatch colour color count "
    "position texture edges contrast composition harmony geometry plausible realistic artefacts"
)

_PUNCTUATION = ". , ; : ! ? ' \" ( ) [ ] - _ / = + * % # & < > |"


def _tokenizer_corpus() -> list[str]:
    """The built-in text the tiny BPE is trained on: rubric prompts, prompt words, digits, punctuation."""
    grid = ScoreGrid()
    prompts = ("a red circle above a blue square", "two green triangles next to a yellow star")
    corpus = []
    for name in DIMENSIONS:
        for prompt in prompts:
            corpus.append(student_instruction(prompt, name, grid))
            corpus.append(teacher_instruction(prompt, name, grid))
    corpus.append(_PROMPT_WORDS)
    corpus.append(" ".join(_PROMPT_WORDS.split()).capitalize())
    corpus.append(" ".join("0123456789"))
    corpus.append(_PUNCTUATION)
    corpus.append(f"The image shows a red circle. {SCORE_MARKER} 7\n{SCORE_MARKER} 3")
    return corpus


def _tokenizer_class(family: str):
    if family == "qwen3_5":
        from transformers.models.qwen3_5.tokenization_qwen3_5 import PRETOKENIZE_REGEX, Qwen3_5Tokenizer

        return Qwen3_5Tokenizer, PRETOKENIZE_REGEX
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX, Qwen2Tokenizer

    return Qwen2Tokenizer, PRETOKENIZE_REGEX


def build_tiny_tokenizer(family: str = "qwen2_vl", vocab_size: int = 1024):
    """A byte-level BPE trained locally, wrapped in the family's real tokenizer class.

    The pre-tokenizer is the family's own (its regex isolates every digit, so "1".."9" are single
    tokens); the special tokens follow the BPE vocabulary as in the real checkpoints.
    """
    _check_family(family)
    cls, regex = _tokenizer_class(family)
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    bpe.train_from_iterator(_tokenizer_corpus(), trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab = dict(state["vocab"])
    for tok in SPECIAL_TOKENS:  # ids after the BPE vocabulary, as in the real checkpoints
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tokenizer = cls(
        vocab=vocab,
        merges=merges,
        extra_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_max_length=32768,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@dataclass(frozen=True)
class _Dims:
    text_hidden: int
    text_layers: int
    vision_hidden: int
    vision_depth: int


_DIMS = {
    "tiny": _Dims(text_hidden=32, text_layers=2, vision_hidden=16, vision_depth=1),
    "small": _Dims(text_hidden=64, text_layers=4, vision_hidden=32, vision_depth=2),
}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny VLM family {family!r}; valid families: {list(FAMILIES)}")


def _token_ids(tokenizer) -> dict[str, int]:
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    return {
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }


def _text_config(family: str, d: _Dims, vocab_size: int, ids: dict[str, int]) -> dict:
    heads = 2
    head_dim = d.text_hidden // heads
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=d.text_hidden,
        intermediate_size=2 * d.text_hidden,
        num_hidden_layers=d.text_layers,
        num_attention_heads=heads,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        bos_token_id=ids["bos_token_id"],
        eos_token_id=ids["eos_token_id"],
        pad_token_id=ids["pad_token_id"],
    )
    if family in ("qwen2_vl", "qwen2_5_vl"):  # contiguous T/H/W sections (real: [16, 24, 24] of 64)
        half = head_dim // 2
        hw = half * 3 // 8
        cfg["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [half - 2 * hw, hw, hw],
        }
        return cfg
    if family == "qwen3_5":  # partial rotary (real: 0.25 of head_dim 256) and linear-attention layers
        head_dim = d.text_hidden
        rotary = 0.5
        interval = min(4, d.text_layers)  # real: three linear-attention layers, then one full
        cfg["layer_types"] = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(d.text_layers)
        ]
        cfg.update(
            linear_conv_kernel_dim=4,
            linear_key_head_dim=8,
            linear_value_head_dim=8,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
        )
    else:
        rotary = 1.0
    # interleaved T/H/W sections (real Qwen3-VL: [24, 20, 20] of 64)
    half = int(head_dim * rotary) // 2
    hw = half * 5 // 16
    cfg["head_dim"] = head_dim
    cfg["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 5e5 if family == "qwen3_vl" else 1e7,
        "mrope_section": [half - 2 * hw, hw, hw],
        "mrope_interleaved": True,
    }
    if rotary != 1.0:
        cfg["rope_parameters"]["partial_rotary_factor"] = rotary
    return cfg


def _vision_config(family: str, d: _Dims, text_hidden: int) -> dict:
    common = dict(
        depth=d.vision_depth, num_heads=2, in_channels=3, spatial_merge_size=2, temporal_patch_size=2
    )
    if family == "qwen2_vl":
        return dict(common, embed_dim=d.vision_hidden, hidden_size=text_hidden, mlp_ratio=2, patch_size=14)
    if family == "qwen2_5_vl":
        return dict(
            common,
            hidden_size=d.vision_hidden,
            intermediate_size=2 * d.vision_hidden,
            out_hidden_size=text_hidden,
            patch_size=14,
            window_size=56,  # 2x2 merged tokens per window at patch 14
            fullatt_block_indexes=[d.vision_depth - 1],
        )
    cfg = dict(
        common,
        hidden_size=d.vision_hidden,
        intermediate_size=2 * d.vision_hidden,
        out_hidden_size=text_hidden,
        patch_size=16,
        num_position_embeddings=64,  # an 8 x 8 learned grid, resampled to each image's grid
    )
    if family == "qwen3_vl":
        cfg["deepstack_visual_indexes"] = list(range(d.vision_depth))
    return cfg


def _model_and_processor_classes(family: str):
    import transformers as tf

    return {
        "qwen2_vl": (
            tf.Qwen2VLConfig,
            tf.Qwen2VLForConditionalGeneration,
            tf.Qwen2VLProcessor,
            tf.Qwen2VLVideoProcessor,
        ),
        "qwen2_5_vl": (
            tf.Qwen2_5_VLConfig,
            tf.Qwen2_5_VLForConditionalGeneration,
            tf.Qwen2_5_VLProcessor,
            tf.Qwen2VLVideoProcessor,
        ),
        "qwen3_vl": (
            tf.Qwen3VLConfig,
            tf.Qwen3VLForConditionalGeneration,
            tf.Qwen3VLProcessor,
            tf.Qwen3VLVideoProcessor,
        ),
        "qwen3_5": (
            tf.Qwen3_5Config,
            tf.Qwen3_5ForConditionalGeneration,
            tf.Qwen3VLProcessor,
            tf.Qwen3VLVideoProcessor,
        ),
    }[family]


def vision_preset(family: str) -> dict:
    """Image-processor settings of the family: patch 14 + CLIP mean/std (Qwen2 / 2.5), patch 16 + 0.5 / 0.5
    (Qwen3-VL / 3.5); merge 2, temporal patch 2; pixel budget of about 28..128 px squares."""
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    _check_family(family)
    qwen2 = family in ("qwen2_vl", "qwen2_5_vl")
    patch = 14 if qwen2 else 16
    factor = patch * 2
    return dict(
        patch_size=patch,
        temporal_patch_size=2,
        merge_size=2,
        size={"shortest_edge": factor * factor, "longest_edge": 128 * 128},
        image_mean=list(OPENAI_CLIP_MEAN) if qwen2 else [0.5, 0.5, 0.5],
        image_std=list(OPENAI_CLIP_STD) if qwen2 else [0.5, 0.5, 0.5],
    )


def build_tiny_processor(family: str, tokenizer=None, chat_template: str = CHAT_TEMPLATE):
    """The family's real processor with the real (torchvision) image processor, on the tiny tokenizer
    (or on ``tokenizer``, e.g. the real Qwen BPE of :mod:`zr_diffusion.vlm.qwen_tokenizer`)."""
    from transformers import Qwen2VLImageProcessor

    _, _, processor_cls, video_cls = _model_and_processor_classes(family)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(family)
    preset = vision_preset(family)
    image_processor = Qwen2VLImageProcessor(**preset)
    video_processor = video_cls(**preset)
    return processor_cls(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
    )


def build_tiny_config(family: str, tokenizer, size: str = "tiny"):
    """The family's real config class with tiny text and vision towers; token ids match ``tokenizer``."""
    _check_family(family)
    if size not in _DIMS:
        raise ValueError(f"unknown tiny VLM size {size!r}; valid sizes: {list(SIZES)}")
    d = _DIMS[size]
    config_cls = _model_and_processor_classes(family)[0]
    ids = _token_ids(tokenizer)
    vocab_size = -(-len(tokenizer) // 64) * 64
    config = config_cls(
        text_config=_text_config(family, d, vocab_size, ids),
        vision_config=_vision_config(family, d, d.text_hidden),
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=False,
    )
    return config


def make_tiny_vlm(
    out_dir: str | Path,
    family: str = "qwen2_vl",
    seed: int = 0,
    size: str = "tiny",
    tokenizer=None,
    chat_template: str = CHAT_TEMPLATE,
) -> Path:
    """Build, seed and save a tiny ``family`` VLM and its processor into ``out_dir`` (safetensors).

    ``size="small"`` is a somewhat larger variant (e.g. a teacher next to a tiny student); both share
    one tokenizer per family, so teacher and student vocabularies agree. ``tokenizer``: another
    tokenizer with the Qwen special tokens (default: the tiny BPE), e.g. the real Qwen BPE;
    ``chat_template``: another chat template (e.g. one that opens a ``<think>`` block).
    """
    from transformers.utils import logging as hf_logging

    _check_family(family)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tiny_tokenizer(family)
    processor = build_tiny_processor(family, tokenizer, chat_template)
    config = build_tiny_config(family, tokenizer, size)
    model_cls = _model_and_processor_classes(family)[1]
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    ids = _token_ids(tokenizer)
    model.generation_config.bos_token_id = ids["bos_token_id"]
    model.generation_config.eos_token_id = [ids["eos_token_id"], ids["pad_token_id"]]
    model.generation_config.pad_token_id = ids["pad_token_id"]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a tiny save is not worth a progress bar
    try:
        model.save_pretrained(out)
        processor.save_pretrained(out)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    return out
