"""Z-Image adapter: single-stream DiT fed per-image lists, Qwen3 text features, flow matching.

Guidance follows ZImagePipeline: on when guidance_scale > 0, ``pred = pos + g * (pos - neg)``
(Z-Image-Turbo samples with g = 0). CFG renormalisation and truncation are not implemented. There is
no default: the distilled Turbo wants 0 and the base model CFG, and their pipelines look alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DiffusionPipeline

from zr_diffusion.pipelines.base import Conditioning
from zr_diffusion.pipelines.flow import FlowMatchAdapter


@dataclass
class ZImageConditioning(Conditioning):
    prompt_embeds: list[torch.Tensor]  # B x [L_i, D], padding removed
    negative_embeds: list[torch.Tensor] | None  # B x [L_i, D]; None when guidance is off

    @property
    def do_cfg(self) -> bool:
        return self.negative_embeds is not None


class ZImageAdapter(FlowMatchAdapter):
    """ZImagePipeline (Z-Image, Z-Image-Turbo)."""

    family = "zimage"
    pipeline_classes = ("ZImagePipeline",)
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_key_markers = ("layers.", "noise_refiner.", "context_refiner.")

    def __init__(self, pipe: DiffusionPipeline, max_sequence_length: int | None = None):
        super().__init__(pipe)
        self.max_sequence_length = max_sequence_length or min(512, pipe.tokenizer.model_max_length)

    def default_guidance_scale(self) -> float:
        raise ValueError(
            "Z-Image needs an explicit guidance_scale (sampler.guidance_scale for zr finetune-t2i, "
            "guidance_scale for zr eval-t2i): Z-Image-Turbo is distilled and samples with 0 (no CFG); the "
            "base Z-Image uses CFG, pred = pos + g * (pos - neg), e.g. 4.0 (ZImagePipeline's default is 5.0)"
        )

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
    ) -> ZImageConditioning:
        self._check_prompts(prompts, negative_prompts)
        guidance_scale = self._guidance(guidance_scale)
        do_cfg = guidance_scale > 0
        embeds, negative = self.pipe.encode_prompt(
            list(prompts),  # copied: the pipeline rewrites the list in place with the chat template
            device=self.device,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=list(negative_prompts) if negative_prompts else None,
            max_sequence_length=self.max_sequence_length,
        )
        return ZImageConditioning(list(prompts), guidance_scale, embeds, negative if do_cfg else None)

    def _guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: ZImageConditioning
    ) -> torch.Tensor:
        b = latents.shape[0]
        t = (1000 - timesteps) / 1000  # [B] the transformer counts time upwards
        x = latents.to(self.dtype).unsqueeze(2)  # [B, C, 1, h, w]: one frame per image
        if cond.do_cfg:
            x, t, caps = x.repeat(2, 1, 1, 1, 1), t.repeat(2), cond.prompt_embeds + cond.negative_embeds
        else:
            caps = cond.prompt_embeds
        out = self.denoiser(list(x.unbind(0)), t, caps, return_dict=False)[0]
        out = torch.stack([o.float() for o in out]).squeeze(2)  # [B or 2B, C, h, w]
        if cond.do_cfg:
            pos, neg = out[:b], out[b:]
            out = pos + cond.guidance_scale * (pos - neg)
        return -out  # the transformer predicts x0 - noise; the sampler's velocity is noise - x0
