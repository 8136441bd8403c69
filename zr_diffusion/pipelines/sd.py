"""Stable Diffusion 1.x / 2.x adapter: UNet, classifier-free guidance, deterministic DDIM (eta = 0)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DiffusionPipeline

from zr_diffusion.pipelines.base import Conditioning, StepOutput, T2IAdapter

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass
class SDConditioning(Conditioning):
    prompt_embeds: torch.Tensor  # [B, L, D]
    negative_embeds: torch.Tensor | None  # [B, L, D]; None when guidance is off (scale <= 1)

    @property
    def do_cfg(self) -> bool:
        return self.negative_embeds is not None


class DDIMAdapter(T2IAdapter):
    """Shared by the UNet families: DDIM update for epsilon, v and sample prediction.

    A pipeline shipped with another scheduler (SD 1.5 ships PNDM) gets a DDIMScheduler built from
    the same config, since the differentiable sampler implements the DDIM update. ``from_config``
    fills ``clip_sample=True`` where the source config has no such key (PNDM, DPM-Solver); clamping
    latents to [-1, 1] at every step is wrong for latent diffusion and kills the gradient, so the
    converted scheduler always gets ``clip_sample=False``, the value StableDiffusionPipeline corrects it to.
    """

    denoiser_name = "unet"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    lora_key_markers = ("down_blocks.", "mid_block.", "up_blocks.")

    def __init__(self, pipe: DiffusionPipeline):
        super().__init__(pipe)
        if not isinstance(pipe.scheduler, DDIMScheduler):
            pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
        config = pipe.scheduler.config
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type {config.prediction_type!r} not supported; valid: {PREDICTION_TYPES}"
            )
        if config.thresholding:
            raise ValueError("DDIM dynamic thresholding is not supported by the differentiable sampler")

    @property
    def scheduler(self) -> DDIMScheduler:
        return self.pipe.scheduler

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.pipe.vae_scale_factor
        if height % f or width % f:
            raise ValueError(
                f"height and width must be multiples of {f} for {self.family}, got {height}x{width}"
            )
        return (batch, self.denoiser.config.in_channels, height // f, width // f)

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        self.scheduler.set_timesteps(num_steps, device=self.device)
        self.timesteps = self.scheduler.timesteps  # [T] integer timesteps, decreasing
        return self.timesteps

    def _alphas(self, t_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        sched = self.scheduler
        t = int(self.timesteps[t_index])
        prev_t = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a_t = sched.alphas_cumprod[t]
        a_prev = sched.alphas_cumprod[prev_t] if prev_t >= 0 else sched.final_alpha_cumprod
        return a_t.to(self.device), a_prev.to(self.device)

    def step(self, model_output: torch.Tensor, t_index: int, latents: torch.Tensor) -> StepOutput:
        a_t, a_prev = self._alphas(t_index)
        out, x = model_output.float(), latents.float()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            x0, eps = (x - (1 - a_t).sqrt() * out) / a_t.sqrt(), out
        elif kind == "v_prediction":
            x0 = a_t.sqrt() * x - (1 - a_t).sqrt() * out
            eps = a_t.sqrt() * out + (1 - a_t).sqrt() * x
        else:  # "sample"
            x0, eps = out, (x - a_t.sqrt() * out) / (1 - a_t).sqrt()
        if self.scheduler.config.clip_sample:
            r = self.scheduler.config.clip_sample_range
            x0 = x0.clamp(-r, r)
        prev = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        return StepOutput(prev_latents=prev, pred_x0=x0)

    def renoise(self, x0: torch.Tensor, t_index: int, noise: torch.Tensor) -> torch.Tensor:
        a_t, _ = self._alphas(t_index)
        return a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:  # SDXL-style per-channel normalisation
            mean = torch.tensor(mean, device=latents.device).view(1, -1, 1, 1)
            std = torch.tensor(std, device=latents.device).view(1, -1, 1, 1)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor

    def _guide(self, out: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if not cond.do_cfg:
            return out
        uncond, text = out.chunk(2)  # [B, C, h, w] each
        return uncond + cond.guidance_scale * (text - uncond)


class SDAdapter(DDIMAdapter):
    """StableDiffusionPipeline (SD 1.x / 2.x). Guidance: CFG when guidance_scale > 1, default 7.5."""

    family = "sd"
    pipeline_classes = ("StableDiffusionPipeline",)

    def default_guidance_scale(self) -> float:
        return 7.5  # StableDiffusionPipeline.__call__'s default

    @torch.no_grad()
    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
    ) -> SDConditioning:
        self._check_prompts(prompts, negative_prompts)
        guidance_scale = self._guidance(guidance_scale)
        do_cfg = guidance_scale > 1.0
        embeds, negative = self.pipe.encode_prompt(
            list(prompts), self.device, 1, do_cfg, negative_prompt=negative_prompts
        )
        return SDConditioning(list(prompts), guidance_scale, embeds, negative if do_cfg else None)

    def _guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: SDConditioning
    ) -> torch.Tensor:
        x = torch.cat([latents, latents]) if cond.do_cfg else latents  # [2B or B, C, h, w]
        t = timesteps.repeat(2) if cond.do_cfg else timesteps  # [2B or B]
        embeds = torch.cat([cond.negative_embeds, cond.prompt_embeds]) if cond.do_cfg else cond.prompt_embeds
        out = self.denoiser(x.to(self.dtype), t, encoder_hidden_states=embeds, return_dict=False)[0]
        return self._guide(out, cond)
