"""Shared by the flow-matching families (Flux.1, Z-Image): deterministic Euler on the velocity field.

With sigma the noise level of the step (x = (1 - sigma) * x0 + sigma * noise) and v the guided
velocity, one step is ``x' = x + (sigma_next - sigma) * v`` and the clean prediction ``x0 = x - sigma * v``.
"""

from __future__ import annotations

import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from zr_diffusion.pipelines.base import StepOutput, T2IAdapter


class FlowMatchAdapter(T2IAdapter):
    denoiser_name = "transformer"

    def __init__(self, pipe: DiffusionPipeline):
        super().__init__(pipe)
        sched = pipe.scheduler
        if not isinstance(sched, FlowMatchEulerDiscreteScheduler):
            raise ValueError(
                f"{self.family} needs FlowMatchEulerDiscreteScheduler, got {type(sched).__name__}"
            )
        if sched.config.stochastic_sampling or sched.config.invert_sigmas:
            raise ValueError(
                "stochastic_sampling / invert_sigmas schedulers are not supported; set both to False"
            )
        self.sigmas: torch.Tensor | None = None  # [T + 1], last entry 0

    @property
    def scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        return self.pipe.scheduler

    def latent_channels(self) -> int:
        return self.denoiser.config.in_channels

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        f = self.pipe.vae_scale_factor
        if height % (2 * f) or width % (2 * f):
            raise ValueError(
                f"height and width must be multiples of {2 * f} for {self.family}, got {height}x{width}"
            )
        return (batch, self.latent_channels(), height // f, width // f)

    def base_sigmas(self, num_steps: int) -> list[float]:
        """Unshifted sigmas 1 .. 1/T, computed as the family's pipeline computes them."""
        return torch.linspace(1.0, 1 / num_steps, num_steps).tolist()

    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        if num_steps <= 0:
            raise ValueError(f"num_steps must be positive, got {num_steps}")
        _, _, h, w = self.latent_shape(1, height, width)
        config = self.scheduler.config
        mu = calculate_shift(
            (h // 2) * (w // 2),  # image tokens after 2x2 patching
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        self.scheduler.set_timesteps(sigmas=self.base_sigmas(num_steps), mu=mu, device=self.device)
        self.timesteps = self.scheduler.timesteps  # [T] = sigma * num_train_timesteps
        self.sigmas = self.scheduler.sigmas.to(self.device)  # [T + 1]
        return self.timesteps

    def step(self, model_output: torch.Tensor, t_index: int, latents: torch.Tensor) -> StepOutput:
        sigma, sigma_next = self.sigmas[t_index], self.sigmas[t_index + 1]
        v, x = model_output.float(), latents.float()
        return StepOutput(prev_latents=x + (sigma_next - sigma) * v, pred_x0=x - sigma * v)

    def renoise(self, x0: torch.Tensor, t_index: int, noise: torch.Tensor) -> torch.Tensor:
        sigma = self.sigmas[t_index]
        return sigma * noise + (1 - sigma) * x0

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.vae.config
        return latents / config.scaling_factor + (config.shift_factor or 0.0)
