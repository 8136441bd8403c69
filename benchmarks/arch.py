"""Real architectures with random weights, from the plain config files in ``configs/arch/*.json``.

Text-to-image pipelines (SD 1.5, SDXL, Flux.1, Z-Image, and a medium SD-shaped one) and reward VLMs
(Qwen2-VL-2B, Qwen3.5-9B, a medium Qwen2-VL) are built from their public hyper-parameters on the target
device and dtype; nothing is downloaded. Tokenizers are the repository's offline byte-level ones (ids stay
inside the real vocabularies), so prompt lengths are those of the real tokenizers' padding rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ARCH_DIR = Path(__file__).resolve().parent.parent / "configs" / "arch"
T2I_ARCHS = ("medium", "sd15", "sdxl", "flux1", "zimage")
VLM_ARCHS = ("qwen2_vl_medium", "qwen2_vl_2b", "qwen3_5_9b")


def load_arch(name: str) -> dict:
    """The config file ``configs/arch/<name>.json``; an unknown name is an error listing the valid ones."""
    path = ARCH_DIR / f"{name}.json"
    if not path.is_file():
        valid = sorted(p.stem for p in ARCH_DIR.glob("*.json"))
        raise ValueError(f"no architecture file {path}; valid names: {valid}")
    return json.loads(path.read_text())


def _pipeline(arch: dict):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        Qwen3Config,
        Qwen3Model,
        T5Config,
        T5EncoderModel,
    )

    from zr_diffusion.pipelines.tiny import _clip_tokenizer, _qwen_tokenizer, _t5_tokenizer

    family, vae = arch["family"], AutoencoderKL(**arch["vae"])
    if family == "sd":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            tokenizer=_clip_tokenizer(77),
            unet=UNet2DConditionModel(**arch["unet"]),
            scheduler=DDIMScheduler(**arch["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**arch["text_encoder_2"])),
            tokenizer=_clip_tokenizer(77),
            tokenizer_2=_clip_tokenizer(77),
            unet=UNet2DConditionModel(**arch["unet"]),
            scheduler=DDIMScheduler(**arch["scheduler"]),
        )
    if family == "flux":
        return FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**arch["scheduler"]),
            vae=vae,
            text_encoder=CLIPTextModel(CLIPTextConfig(**arch["text_encoder"])),
            tokenizer=_clip_tokenizer(77),
            text_encoder_2=T5EncoderModel(T5Config(**arch["text_encoder_2"])),
            tokenizer_2=_t5_tokenizer(512),
            transformer=FluxTransformer2DModel(**arch["transformer"]),
        )
    if family == "zimage":
        return ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**arch["scheduler"]),
            vae=vae,
            text_encoder=Qwen3Model(Qwen3Config(**arch["text_encoder"])),
            tokenizer=_qwen_tokenizer(512),
            transformer=ZImageTransformer2DModel(**arch["transformer"]),
        )
    raise ValueError(f"architecture {arch['name']!r} has unknown family {family!r}")


def build_t2i(name: str, dtype: torch.dtype = torch.float32, device: str = "cpu", seed: int = 0):
    """The family adapter on a random-weight pipeline of architecture ``name`` (built on ``device``)."""
    from zr_diffusion.pipelines.adapters import ADAPTERS

    arch = load_arch(name)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise in the target dtype: a 12B fp32 copy would not fit beside it
    try:
        with torch.device(device):
            pipe = _pipeline(arch)
    finally:
        torch.set_default_dtype(default)
    return ADAPTERS[arch["family"]](pipe.to(device, dtype))


def build_reward(
    name: str,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    max_pixels: int | None = None,
    checkpoint_layers: bool = False,
):
    """A frozen ``ZRewardModel`` on a random-weight VLM of architecture ``name`` (built on ``device``)."""
    from transformers import Qwen2VLImageProcessor

    from zr_diffusion.reward.model import ZRewardModel
    from zr_diffusion.vlm.tiny import (
        CHAT_TEMPLATE,
        _model_and_processor_classes,
        _token_ids,
        build_tiny_tokenizer,
        vision_preset,
    )

    arch = load_arch(name)
    family = arch["family"]
    config_cls, model_cls, processor_cls, video_cls = _model_and_processor_classes(family)
    tokenizer = build_tiny_tokenizer(family)
    budget = arch["processor"]
    preset = dict(
        vision_preset(family),
        size={"shortest_edge": budget["min_pixels"], "longest_edge": budget["max_pixels"]},
    )
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**preset),
        tokenizer=tokenizer,
        video_processor=video_cls(**preset),
        chat_template=CHAT_TEMPLATE,
    )
    ids = _token_ids(tokenizer)
    config = config_cls(
        text_config=dict(
            arch["text_config"], **{k: ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
        ),
        vision_config=arch["vision_config"],
        image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"],
        vision_start_token_id=ids["vision_start_token_id"],
        vision_end_token_id=ids["vision_end_token_id"],
        tie_word_embeddings=arch["tie_word_embeddings"],
    )
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls._from_config(config, dtype=dtype).eval()
    return ZRewardModel(model, processor, max_pixels=max_pixels, checkpoint_layers=checkpoint_layers)


def parameter_count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())
