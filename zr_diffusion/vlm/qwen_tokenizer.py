"""The real Qwen2/2.5/3-VL byte-level BPE, built offline from the ranks file that ``dashscope`` ships.

``dashscope`` (Apache-2.0) carries Qwen's 151,643 regular BPE ranks as
``dashscope/resources/qwen.tiktoken``; with ``tiktoken`` installed, transformers'
``TikTokenConverter`` turns them into the real tokenizer, with Qwen's pre-tokenizer pattern (every
digit its own pre-token) and the special tokens at their real ids (151643 onwards). Tests use it to
check what a real checkpoint would tokenize ("Score: 7" -> ``Score``, ``:``, `` ``, ``7``); both
packages are in the ``dev`` extra.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from zr_diffusion.vlm.tiny import CHAT_TEMPLATE, SPECIAL_TOKENS

# Qwen2's pre-tokenizer: like cl100k's, but one digit per pre-token (``\p{N}``, not ``\p{N}{1,3}``).
QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_REGULAR_TOKENS = 151643  # the ranks file; the special tokens follow from this id on
QWEN_VOCAB_SIZE = NUM_REGULAR_TOKENS + len(SPECIAL_TOKENS)  # 151,657


def dashscope_ranks_file() -> Path:
    """``qwen.tiktoken`` inside the installed ``dashscope`` package (not imported, only located)."""
    spec = importlib.util.find_spec("dashscope")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the real Qwen tokenizer needs the `dashscope` package (its resources/qwen.tiktoken): "
            "pip install -e '.[dev]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed dashscope package")
    return path


def build_qwen_tokenizer(ranks_file: str | Path | None = None):
    """The real Qwen2 tokenizer (``Qwen2Tokenizer``, 151,657 tokens) with the tiny models' chat template.

    ``ranks_file``: a ``qwen.tiktoken`` file; default the one in the installed ``dashscope``.
    """
    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    path = Path(ranks_file) if ranks_file is not None else dashscope_ranks_file()
    backend = TikTokenConverter(
        vocab_file=str(path), pattern=QWEN_PATTERN, extra_special_tokens=list(SPECIAL_TOKENS)
    ).converted()
    backend.normalizer = normalizers.NFC()
    tokenizer = Qwen2Tokenizer(
        tokenizer_object=backend, extra_special_tokens=list(SPECIAL_TOKENS[1:]), model_max_length=32768
    )
    if len(tokenizer) != QWEN_VOCAB_SIZE or tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS[0]) != 151643:
        raise ValueError(
            f"{path} does not hold Qwen's {NUM_REGULAR_TOKENS} BPE ranks: built {len(tokenizer)} tokens, "
            f"expected {QWEN_VOCAB_SIZE} with <|endoftext|> at 151643"
        )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


__all__ = ["QWEN_PATTERN", "QWEN_VOCAB_SIZE", "build_qwen_tokenizer", "dashscope_ranks_file"]
