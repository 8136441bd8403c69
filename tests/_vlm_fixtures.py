"""Shared tiny-VLM builders for the vlm / preprocess / reward-model tests (built once per process)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


from zr_diffusion.vlm.tiny import FAMILIES, make_tiny_vlm  # noqa: E402

_ROOT: Path | None = None
_BUILT: dict[tuple[str, str, int], Path] = {}


def tiny_vlm_dir(family: str = "qwen2_vl", size: str = "tiny", seed: int = 0) -> Path:
    """A saved tiny VLM folder of ``family``; built on first use, shared by all tests of the run."""
    global _ROOT
    if _ROOT is None:
        _ROOT = Path(tempfile.mkdtemp(prefix="zr_tiny_vlm_"))
        atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)
    key = (family, size, seed)
    if key not in _BUILT:
        _BUILT[key] = make_tiny_vlm(_ROOT / f"{family}-{size}-{seed}", family, seed=seed, size=size)
    return _BUILT[key]


__all__ = ["FAMILIES", "tiny_vlm_dir"]
