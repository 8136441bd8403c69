"""Differentiable sampling for reward-gradient fine-tuning (METHOD.md section 6).

Every mode runs the first steps under ``torch.no_grad()`` and builds a graph only inside a window of
steps (indices 0..T-1 in sampling order), so memory does not grow with the number of steps T:

- ``draft``  (DRaFT-K): gradient through the last K steps; the final sample is scored. K = 1 default.
  ``draft_lv = n`` (DRaFT-LV) adds n copies of the last step: the final sample is re-noised to the
  last step's noise level with fresh noise and denoised again with a graph; all 1 + n are scored.
- ``refl``   (ReFL): no-grad to a step s drawn uniformly from ``refl_window``, one step with gradient
  at s, and the predicted clean image at s is scored (also when s = T - 1); later steps are not run.
- ``window`` gradient through steps [start, end]; reaches earlier steps than DRaFT-K without running
  the steps after ``end``: when end < T - 1 the predicted clean image at ``end`` is scored, when
  end = T - 1 the final sample is (``window=(T - K, T - 1)`` is DRaFT-K).

Inside the window, memory is traded for recomputation (``torch.utils.checkpoint``, ``use_reentrant=False``)
as the config says:

- ``denoiser_checkpoint="call"``: each denoiser call of the window is one checkpoint; only its inputs
  are kept, and backward recomputes the whole call, holding one full forward's activations at once.
- ``"blocks"``: diffusers' own per-block checkpointing (``enable_gradient_checkpointing()``); the
  installed diffusers checks ``torch.is_grad_enabled() and self.gradient_checkpointing`` (not
  ``self.training``), so it acts on the eval-mode denoiser inside the window and never in the no-grad
  prefix. Backward holds one block's activations at a time.
- ``"none"``: the window's activations are kept; no recompute (fastest for K = 1 when memory allows).
- ``checkpoint_decoder`` / ``decode_per_image``: the VAE decode is checkpointed, one micro-batch or one
  image per checkpoint, so backward recomputes one image's decoder activations at a time.

Every option leaves the gradients unchanged (tests/test_sampler.py compares them). One speed option
changes numbers on purpose: ``prefix_dtype`` runs the no-grad steps before the window under autocast
(bfloat16 / float16, meant for GPUs); the window and the decode stay in the configured precision.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch.utils.checkpoint import checkpoint

from zr_diffusion.pipelines.base import Conditioning, StepOutput, T2IAdapter

Mode = Literal["draft", "refl", "window"]
MODES = ("draft", "refl", "window")
DenoiserCheckpoint = Literal["call", "blocks", "none"]
DENOISER_CHECKPOINTS = ("call", "blocks", "none")
PrefixDtype = Literal["bfloat16", "float16"]
PREFIX_DTYPES = ("bfloat16", "float16")


@dataclass
class SamplerConfig:
    """How to sample and where gradients flow."""

    num_steps: int = 20  # T denoising steps
    guidance_scale: float | None = None  # family's convention; None: its default (Z-Image has none)
    height: int = 512  # image size in pixels
    width: int = 512
    mode: Mode = "draft"
    draft_k: int = 1  # draft: gradient through the last K steps
    draft_lv: int = 0  # draft: DRaFT-LV extra re-noised copies of the last step (0 = off)
    refl_window: tuple[int, int] | None = None  # refl: inclusive step range for s; None = last quarter
    window: tuple[int, int] | None = None  # window: inclusive step range with gradient (required)
    denoiser_checkpoint: DenoiserCheckpoint = "call"  # window steps: whole call | per block | none
    checkpoint_decoder: bool = True  # recompute the VAE decode in backward
    decode_per_image: bool = False  # decode (and checkpoint) one image at a time
    prefix_dtype: PrefixDtype | None = (
        None  # autocast dtype of the no-grad steps; None = configured precision
    )

    def __post_init__(self) -> None:
        T = self.num_steps
        if T <= 0:
            raise ValueError(f"num_steps must be positive, got {T}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.prefix_dtype is not None and self.prefix_dtype not in PREFIX_DTYPES:
            raise ValueError(
                f"prefix_dtype must be one of {PREFIX_DTYPES} or null, got {self.prefix_dtype!r}"
            )
        if self.denoiser_checkpoint not in DENOISER_CHECKPOINTS:
            raise ValueError(
                f"denoiser_checkpoint must be one of {DENOISER_CHECKPOINTS}, got {self.denoiser_checkpoint!r}"
            )
        if not 1 <= self.draft_k <= T:
            raise ValueError(f"draft_k must be in 1..num_steps={T}, got {self.draft_k}")
        if self.draft_lv < 0:
            raise ValueError(f"draft_lv must be >= 0, got {self.draft_lv}")
        if self.draft_lv and self.mode != "draft":
            raise ValueError(f"draft_lv={self.draft_lv} needs mode='draft', got mode={self.mode!r}")
        if self.refl_window is not None and self.mode != "refl":
            raise ValueError(f"refl_window={self.refl_window} needs mode='refl', got mode={self.mode!r}")
        if self.window is not None and self.mode != "window":
            raise ValueError(f"window={self.window} needs mode='window', got mode={self.mode!r}")
        if self.mode == "window" and self.window is None:
            raise ValueError(
                "mode='window' needs window=(start, end), inclusive step indices in 0..num_steps-1"
            )
        for name in ("refl_window", "window"):
            value = getattr(self, name)
            if value is not None:
                start, end = value
                if not 0 <= start <= end < T:
                    raise ValueError(f"{name}={value} must satisfy 0 <= start <= end < num_steps={T}")

    def resolved_refl_window(self) -> tuple[int, int]:
        if self.refl_window is not None:
            return tuple(self.refl_window)
        return (self.num_steps - max(1, self.num_steps // 4), self.num_steps - 1)


@dataclass
class SampleInfo:
    mode: str
    grad_steps: list[int] = field(default_factory=list)  # steps that ran with a graph
    scored: Literal["final", "pred_x0"] = "final"  # what was decoded: final sample or x0-prediction
    stop_step: int = -1  # last step run
    lv_copies: int = 0  # DRaFT-LV copies appended after the B main images


@dataclass
class SampleOutput:
    images: torch.Tensor  # [B', 3, H, W] in [0, 1]; B' = B * (1 + lv_copies), copies after the main B
    latents: torch.Tensor  # [B', C, h, w] the decoded latents
    prompts: list[str]  # B' prompts, the prompt of each image
    info: SampleInfo


def _grad_range(config: SamplerConfig, generator: torch.Generator | None) -> tuple[int, int]:
    T = config.num_steps
    if config.mode == "draft":
        return T - config.draft_k, T - 1
    if config.mode == "refl":
        lo, hi = config.resolved_refl_window()
        s = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        return s, s
    return tuple(config.window)


def _step_with_grad(
    adapter: T2IAdapter, x: torch.Tensor, i: int, cond: Conditioning, how: DenoiserCheckpoint
) -> StepOutput:
    if how != "call":  # "blocks": the denoiser checkpoints its own blocks (set_block_checkpointing)
        return adapter.denoise(x, i, cond)

    def run(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = adapter.denoise(z, i, cond)
        return out.prev_latents, out.pred_x0

    prev, x0 = checkpoint(run, x, use_reentrant=False)
    return StepOutput(prev_latents=prev, pred_x0=x0)


def _prefix_autocast(device: torch.device, dtype: str | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def set_block_checkpointing(denoiser: torch.nn.Module, enabled: bool) -> None:
    """Turn diffusers' per-block gradient checkpointing of ``denoiser`` on or off (a no-op when it is
    already so). It acts whenever grad is enabled, in eval mode too (see the module docstring)."""
    if enabled == denoiser.is_gradient_checkpointing:
        return
    if enabled:
        denoiser.enable_gradient_checkpointing()
    else:
        denoiser.disable_gradient_checkpointing()


def _decode(adapter: T2IAdapter, latents: torch.Tensor, config: SamplerConfig) -> torch.Tensor:
    """VAE decode ``[B', C, h, w] -> [B', 3, H, W]``, checkpointed per micro-batch or per image."""
    ckpt = config.checkpoint_decoder and torch.is_grad_enabled() and latents.requires_grad
    chunks = latents.split(1) if config.decode_per_image else (latents,)
    images = [
        checkpoint(adapter.decode, z, use_reentrant=False) if ckpt else adapter.decode(z) for z in chunks
    ]
    return images[0] if len(images) == 1 else torch.cat(images)


def sample(
    adapter: T2IAdapter,
    prompts: list[str],
    config: SamplerConfig,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    negative_prompts: list[str] | None = None,
    grad: bool = True,
) -> SampleOutput:
    """Sample images for ``prompts``; with ``grad`` a graph is built only inside the mode's window.

    ``grad=False`` runs all T steps without a graph and decodes the final sample (evaluation).
    """
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    T = config.num_steps
    set_block_checkpointing(adapter.denoiser, grad and config.denoiser_checkpoint == "blocks")
    cond = adapter.encode_prompts(prompts, negative_prompts, guidance_scale=config.guidance_scale)
    adapter.set_timesteps(T, config.height, config.width)
    x = adapter.initial_latents(len(prompts), config.height, config.width, generator)  # [B, C, h, w]

    start, end = _grad_range(config, generator) if grad else (T, T - 1)
    with torch.no_grad(), _prefix_autocast(adapter.device, config.prefix_dtype):
        for i in range(min(start, T)):
            x = adapter.denoise_step(x, i, cond)
    info = SampleInfo(mode=config.mode if grad else "no_grad", stop_step=T - 1)
    step = None
    for i in range(start, end + 1):
        step = _step_with_grad(adapter, x, i, cond, config.denoiser_checkpoint)
        x = step.prev_latents
        info.grad_steps.append(i)
    if step is not None and (config.mode == "refl" or end < T - 1):  # score the clean prediction
        x, info.scored, info.stop_step = step.pred_x0, "pred_x0", end

    latents, image_prompts = [x], list(prompts)
    if grad and config.draft_lv:
        final = x.detach()
        for _ in range(config.draft_lv):
            noise = torch.randn(final.shape, generator=generator, dtype=final.dtype).to(final.device)
            noisy = adapter.renoise(final, T - 1, noise)  # [B, C, h, w] at the last step's noise level
            latents.append(
                _step_with_grad(adapter, noisy, T - 1, cond, config.denoiser_checkpoint).prev_latents
            )
            image_prompts += list(prompts)
        info.lv_copies = config.draft_lv
    latents = torch.cat(latents)  # [B', C, h, w]
    with torch.set_grad_enabled(grad):
        images = _decode(adapter, latents, config)
    return SampleOutput(images=images, latents=latents, prompts=image_prompts, info=info)
