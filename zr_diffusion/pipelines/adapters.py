"""The explicit table of pipeline adapters, and loading a saved pipeline into its family's adapter.

Adding a family = one adapter file + one entry in ``ADAPTERS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline

from zr_diffusion.io import check_model_source
from zr_diffusion.pipelines.base import T2IAdapter
from zr_diffusion.pipelines.flux import FluxAdapter
from zr_diffusion.pipelines.sd import SDAdapter
from zr_diffusion.pipelines.sdxl import SDXLAdapter
from zr_diffusion.pipelines.zimage import ZImageAdapter

ADAPTERS: dict[str, type[T2IAdapter]] = {
    "sd": SDAdapter,
    "sdxl": SDXLAdapter,
    "flux": FluxAdapter,
    "zimage": ZImageAdapter,
}


def detect_family(path: str | Path) -> str:
    """The family of a saved pipeline (local folder or hub id), from model_index.json's ``_class_name``."""
    class_name = DiffusionPipeline.load_config(str(path)).get("_class_name")
    for family, adapter in ADAPTERS.items():
        if class_name in adapter.pipeline_classes:
            return family
    supported = {c: f for f, a in ADAPTERS.items() for c in a.pipeline_classes}
    raise ValueError(f"pipeline class {class_name!r} at {path} is not supported; supported: {supported}")


def load_adapter(
    path: str | Path,
    family: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> T2IAdapter:
    """Load the pipeline at ``path`` and wrap it in its family's adapter (family detected when None)."""
    path = check_model_source(path, "pipeline")
    family = family or detect_family(path)
    if family not in ADAPTERS:
        raise ValueError(f"unknown family {family!r}; valid: {sorted(ADAPTERS)}")
    return ADAPTERS[family].from_pretrained(path, dtype=dtype, device=device)


__all__ = ["ADAPTERS", "detect_family", "load_adapter"]
