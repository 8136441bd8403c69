"""Shared tiny-VLM builders for the vlm / preprocess / reward-model tests (built once per process)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from functools import cache  # noqa: E402

from zr_diffusion.vlm.tiny import CHAT_TEMPLATE, FAMILIES, make_tiny_vlm  # noqa: E402

_ROOT: Path | None = None
_BUILT: dict[tuple, Path] = {}


def _root() -> Path:
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="zr_tiny_vlm_"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    return _ROOT


def tiny_vlm_dir(family: str = "qwen2_vl", size: str = "tiny", seed: int = 0) -> Path:
    """A saved tiny VLM folder of ``family``; built on first use, shared by all tests of the run."""
    key = (family, size, seed)
    if key not in _BUILT:
        _BUILT[key] = make_tiny_vlm(_root() / f"{family}-{size}-{seed}", family, seed=seed, size=size)
    return _BUILT[key]


@cache
def qwen_tokenizer():
    """The real Qwen2 BPE (151,657 tokens, from dashscope's qwen.tiktoken), built once per run (~6 s)."""
    from zr_diffusion.vlm.qwen_tokenizer import build_qwen_tokenizer

    return build_qwen_tokenizer()


def real_tokenizer_vlm_dir(chat_template: str = CHAT_TEMPLATE, seed: int = 0) -> Path:
    """A tiny Qwen2-VL (hidden size 32) on the real Qwen tokenizer; built once per run and template."""
    key = ("qwen2_vl-real-tokenizer", chat_template, seed)
    if key not in _BUILT:
        out = _root() / f"qwen2_vl-real-tokenizer-{len(_BUILT)}"
        _BUILT[key] = make_tiny_vlm(
            out, "qwen2_vl", seed=seed, tokenizer=qwen_tokenizer(), chat_template=chat_template
        )
    return _BUILT[key]


__all__ = ["FAMILIES", "qwen_tokenizer", "real_tokenizer_vlm_dir", "tiny_vlm_dir"]
