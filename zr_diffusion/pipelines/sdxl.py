"""SDXL adapter: two CLIP text encoders, pooled text + size/crop ids as added conditioning, DDIM."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zr_diffusion.pipelines.sd import DDIMAdapter, SDConditioning


@dataclass
class SDXLConditioning(SDConditioning):
    pooled_embeds: torch.Tensor  # [B, P] from text_encoder_2
    negative_pooled_embeds: torch.Tensor | None  # [B, P]


class SDXLAdapter(DDIMAdapter):
    """StableDiffusionXLPipeline. Guidance: CFG when guidance_scale > 1, default 5.0.

    The added time ids are (original size, crop top-left, target size) = ((H, W), (0, 0), (H, W)),
    the pipeline's defaults, read from the latents' size at each call.
    """

    family = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)

    def default_guidance_scale(self) -> float:
        return 5.0  # StableDiffusionXLPipeline.__call__'s default

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
    ) -> SDXLConditioning:
        self._check_prompts(prompts, negative_prompts)
        guidance_scale = self._guidance(guidance_scale)
        do_cfg = guidance_scale > 1.0
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            list(prompts),
            device=self.device,
            do_classifier_free_guidance=do_cfg,
            negative_prompt=negative_prompts,
        )
        if not do_cfg:
            negative, negative_pooled = None, None
        return SDXLConditioning(list(prompts), guidance_scale, embeds, negative, pooled, negative_pooled)

    def _time_ids(self, latents: torch.Tensor, rows: int) -> torch.Tensor:
        f = self.pipe.vae_scale_factor
        size = (latents.shape[-2] * f, latents.shape[-1] * f)
        proj_dim = self.pipe.text_encoder_2.config.projection_dim
        ids = self.pipe._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype, text_encoder_projection_dim=proj_dim
        )
        return ids.to(self.device).repeat(rows, 1)  # [rows, 6]

    def _guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SDXLConditioning
    ) -> torch.Tensor:
        if cond.do_cfg:
            x = torch.cat([latents, latents])  # [2B, C, h, w]: uncond first, as the pipeline does
            t = timesteps.repeat(2)  # [2B]
            embeds = torch.cat([cond.negative_embeds, cond.prompt_embeds])
            pooled = torch.cat([cond.negative_pooled_embeds, cond.pooled_embeds])
        else:
            x, t, embeds, pooled = latents, timesteps, cond.prompt_embeds, cond.pooled_embeds
        added = {"text_embeds": pooled, "time_ids": self._time_ids(latents, x.shape[0])}
        out = self.denoiser(
            x.to(self.dtype), t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False
        )[0]
        return self._guide(out, cond)
