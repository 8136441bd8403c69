"""Loading Qwen-VL family models and their processors from a local folder or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from zr_diffusion.io import check_model_source

# model_type in config.json -> the transformers class that scores and generates
SUPPORTED_FAMILIES: dict[str, str] = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
}


class UnsupportedModelError(ValueError):
    """The checkpoint's model_type is not one of the supported VLM families."""


def model_class_for(model_type: str):
    """The ``*ForConditionalGeneration`` class of a supported ``model_type``."""
    import transformers

    if model_type not in SUPPORTED_FAMILIES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported VLM family; supported model types: "
            f"{sorted(SUPPORTED_FAMILIES)}"
        )
    return getattr(transformers, SUPPORTED_FAMILIES[model_type])


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a ``torch.dtype`` or its name ("bfloat16", "float32", ...) -> ``torch.dtype``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    valid = ("float32", "float64", "float16", "bfloat16")
    name = str(dtype).removeprefix("torch.")
    if name not in valid:
        raise ValueError(f"unknown dtype {dtype!r}; valid dtypes: {list(valid)}")
    return getattr(torch, name)


def load_vlm(
    path_or_id: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
):
    """Load ``(model, processor)`` of a supported VLM family, in eval mode.

    A local folder and a hub id go through the same ``from_pretrained`` call; ``trust_remote_code``
    stays off unless passed. The model class is chosen from ``config.model_type``.
    """
    from transformers import AutoConfig, AutoProcessor

    source = check_model_source(path_or_id, "reward model")
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    model_cls = model_class_for(config.model_type)
    kwargs = {}
    if (resolved := resolve_dtype(dtype)) is not None:
        kwargs["dtype"] = resolved
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = model_cls.from_pretrained(source, config=config, trust_remote_code=trust_remote_code, **kwargs)
    if device is not None:
        model = model.to(device)
    model.eval()
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=trust_remote_code)
    return model, processor
