"""Flux.1 adapter: MMDiT transformer on 2x2-packed latents, CLIP pooled + T5 sequence conditioning.

Flux.1-dev is guidance-distilled: ``guidance_scale`` is fed to the transformer's guidance embedding and
there is one transformer call per step (no classifier-free guidance, so no negative prompts); default
3.5, FluxPipeline's. Flux.1-schnell has no guidance embedding: its guidance scale is 0 (FluxPipeline
ignores the value; here another value is an error).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DiffusionPipeline, FluxPipeline

from zr_diffusion.pipelines.base import Conditioning
from zr_diffusion.pipelines.flow import FlowMatchAdapter


@dataclass
class FluxConditioning(Conditioning):
    prompt_embeds: torch.Tensor  # [B, L, D] T5 sequence
    pooled_embeds: torch.Tensor  # [B, P] CLIP pooled
    text_ids: torch.Tensor  # [L, 3] rotary position ids of the text tokens
    guidance: torch.Tensor | None  # [B] guidance embedding input; None for models without one (schnell)


class FluxAdapter(FlowMatchAdapter):
    """FluxPipeline (Flux.1 dev / schnell)."""

    family = "flux"
    pipeline_classes = ("FluxPipeline",)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_key_markers = ("transformer_blocks.", "single_transformer_blocks.")

    def __init__(self, pipe: DiffusionPipeline, max_sequence_length: int | None = None):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length or min(512, pipe.tokenizer_2.model_max_length)

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels // 4  # the transformer sees 2x2 patches

    def base_sigmas(self, num_steps: int) -> list[float]:
        return np.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def default_guidance_scale(self) -> float:
        return 3.5 if self.denoiser.config.guidance_embeds else 0.0

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
    ) -> FluxConditioning:
        self._check_prompts(prompts, negative_prompts)
        guidance_scale = self._guidance(guidance_scale)
        if negative_prompts is not None:
            raise ValueError(
                "Flux.1 uses the guidance embedding, not classifier-free guidance: pass no negative_prompts"
            )
        has_embed = self.denoiser.config.guidance_embeds
        if not has_embed and guidance_scale != 0:
            raise ValueError(
                f"this Flux transformer has no guidance embedding; guidance_scale must be 0, got {guidance_scale}"
            )
        embeds, pooled, text_ids = self.pipe.encode_prompt(
            list(prompts), device=self.device, max_sequence_length=self.max_sequence_length
        )
        guidance = (
            torch.full((len(prompts),), float(guidance_scale), device=self.device) if has_embed else None
        )
        return FluxConditioning(list(prompts), guidance_scale, embeds, pooled, text_ids, guidance)

    def _guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: FluxConditioning
    ) -> torch.Tensor:
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents.to(self.dtype), b, c, h, w)  # [B, h/2 * w/2, 4C]
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, self.device, self.dtype)
        t = timesteps.to(self.dtype)  # [B]
        out = self.denoiser(
            hidden_states=packed,
            timestep=t / 1000,
            guidance=cond.guidance,
            pooled_projections=cond.pooled_embeds,
            encoder_hidden_states=cond.prompt_embeds,
            txt_ids=cond.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]  # [B, h/2 * w/2, 4C]
        out = out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return out.reshape(b, c, h, w)
