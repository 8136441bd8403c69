"""Tiny text-to-image pipelines of the real diffusers classes, built offline from constructor arguments.

Every family the adapters support has a builder here: the same pipeline class, denoiser, VAE, text
encoder(s), tokenizer(s) and scheduler as the released model, with hidden sizes of a few channels and
one or two layers. Tokenizers are built from a small in-memory vocabulary (every byte is a token),
so nothing is downloaded. The result is written with ``save_pretrained`` (safetensors) and loads
with ``DiffusionPipeline.from_pretrained(out_dir)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
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
    CLIPTokenizer,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

TINY_FAMILIES = ("sd", "sdxl", "flux", "zimage")

# Z-Image encodes prompts through the tokenizer's chat template (Qwen3 format, no system turn).
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a tiny pipeline.

    sample_size: image side in pixels (the VAE downsamples by 2, so latents are sample_size // 2).
    channels: width of the denoiser and VAE; raise it (with sample_size) to make activations dominate.
    max_text_len: tokenizer max length (CLIP) / max sequence the text encoders see.
    """

    sample_size: int = 32
    channels: int = 8
    max_text_len: int = 77  # byte-level tokens: 77 characters, like real CLIP's 77 tokens

    def __post_init__(self) -> None:
        if self.sample_size % 16 != 0 or self.sample_size <= 0:
            raise ValueError(f"sample_size must be a positive multiple of 16, got {self.sample_size}")
        if self.channels % 8 != 0 or self.channels <= 0:
            raise ValueError(f"channels must be a positive multiple of 8, got {self.channels}")


# ---------------------------------------------------------------- tokenizers (offline, byte-level vocab)


def _clip_tokenizer(max_len: int) -> CLIPTokenizer:
    chars = list(bytes_to_unicode().values())  # 256 printable stand-ins for bytes
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_len)


def _t5_tokenizer(max_len: int) -> T5Tokenizer:
    pieces = ["<pad>", "</s>", "<unk>", "\u2581"]
    pieces += [chr(c) for c in range(33, 127)]  # printable ASCII, one piece per character
    vocab = [(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_len)


def _qwen_tokenizer(max_len: int) -> Qwen2Tokenizer:
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    # the chat template adds about a dozen tokens around the prompt
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], model_max_length=max_len + 32, pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    return tok


# ---------------------------------------------------------------- components


def _clip_config(projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=600,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _vae(spec: TinySpec, latent_channels: int = 4, **scaling: float) -> AutoencoderKL:
    c = spec.channels
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(c, 2 * c),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=spec.sample_size,
        **scaling,
    )


def _unet(spec: TinySpec, cross_attention_dim: int, **extra) -> UNet2DConditionModel:
    c = spec.channels
    return UNet2DConditionModel(
        sample_size=spec.sample_size // 2,
        in_channels=4,
        out_channels=4,
        block_out_channels=(c, 2 * c),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        norm_num_groups=4,
        **extra,
    )


def _ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def _build_sd(spec: TinySpec, prediction_type: str) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=_vae(spec, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_clip_tokenizer(spec.max_text_len),
        unet=_unet(spec, cross_attention_dim=32),
        scheduler=_ddim(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(spec: TinySpec, prediction_type: str) -> StableDiffusionXLPipeline:
    time_dim, proj_dim = 8, 32
    unet = _unet(
        spec,
        cross_attention_dim=64,  # CLIP-L hidden (32) ++ CLIP-G hidden (32)
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=6 * time_dim + proj_dim,  # 6 size/crop ids + pooled text
        use_linear_projection=True,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(spec, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(_clip_config()),
        text_encoder_2=CLIPTextModelWithProjection(_clip_config(projection_dim=proj_dim)),
        tokenizer=_clip_tokenizer(spec.max_text_len),
        tokenizer_2=_clip_tokenizer(spec.max_text_len),
        unet=unet,
        scheduler=_ddim(prediction_type),
    )


def _build_flux(spec: TinySpec, prediction_type: str) -> FluxPipeline:
    _require_flow(prediction_type, "flux")
    t5 = T5EncoderModel(
        T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=37, num_layers=1, num_heads=4, pad_token_id=0)
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=spec.channels * 2,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=True,  # Flux.1-dev: guidance is an embedding, not classifier-free guidance
        axes_dims_rope=(
            spec.channels // 2,
            spec.channels * 3 // 4,
            spec.channels * 3 // 4,
        ),  # sums to head dim
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=64)
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(
            spec, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=CLIPTextModel(_clip_config()),
        tokenizer=_clip_tokenizer(spec.max_text_len),
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(spec.max_text_len),
        transformer=transformer,
    )


def _build_zimage(spec: TinySpec, prediction_type: str) -> ZImagePipeline:
    _require_flow(prediction_type, "zimage")
    tokenizer = _qwen_tokenizer(spec.max_text_len)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=2,  # the pipeline reads hidden_states[-2]
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
        )
    )
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=spec.channels * 4,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[spec.channels, spec.channels // 2, spec.channels // 2],
        axes_lens=[256, 64, 64],
    )
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(
            spec, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False
        ),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _require_flow(prediction_type: str, family: str) -> None:
    if prediction_type != "flow":
        raise ValueError(
            f"family {family!r} is flow matching; prediction_type must be 'flow', got {prediction_type!r}"
        )


_BUILDERS: dict[str, Callable[[TinySpec, str], object]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "flux": _build_flux,
    "zimage": _build_zimage,
}


def build_tiny_t2i(
    family: str, seed: int = 0, spec: TinySpec | None = None, prediction_type: str | None = None
):
    """Build (not save) a tiny pipeline of ``family``; weights are seeded with ``seed``.

    prediction_type: "epsilon" (default) or "v_prediction" for sd/sdxl; "flow" (default) for flux/zimage.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; valid: {sorted(_BUILDERS)}")
    flow = family in ("flux", "zimage")
    prediction_type = prediction_type or ("flow" if flow else "epsilon")
    if not flow and prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(
            f"prediction_type for {family!r} must be 'epsilon' or 'v_prediction', got {prediction_type!r}"
        )
    torch.manual_seed(seed)
    pipe = _BUILDERS[family](spec or TinySpec(), prediction_type)
    return pipe


def make_tiny_t2i(
    out_dir: str | Path,
    family: str,
    seed: int = 0,
    sample_size: int = 32,
    channels: int = 8,
    prediction_type: str | None = None,
) -> Path:
    """Build a tiny pipeline of ``family`` ("sd" | "sdxl" | "flux" | "zimage") and save it to ``out_dir``.

    Returns ``out_dir``; ``DiffusionPipeline.from_pretrained(out_dir)`` loads it. See ``TinySpec`` for sizes.
    """
    pipe = build_tiny_t2i(family, seed, TinySpec(sample_size=sample_size, channels=channels), prediction_type)
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out
