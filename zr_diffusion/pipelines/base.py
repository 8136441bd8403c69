"""The adapter protocol every diffusers family implements, and what the families share.

An adapter wraps one loaded diffusers pipeline and exposes the pieces a reward-gradient sampler
needs, each a plain differentiable function of tensors:

    cond    = adapter.encode_prompts(prompts, guidance_scale=...)     # frozen text encoders, no grad (None: default)
    x       = adapter.initial_latents(B, H, W, generator)             # [B, C, h, w]
    adapter.set_timesteps(T, H, W)
    step    = adapter.denoise(x, i, cond)                             # one step i in 0..T-1, guidance included
    x, x0   = step.prev_latents, step.pred_x0                         # x0: predicted clean latents (ReFL)
    images  = adapter.decode(x)                                       # [B, 3, H, W] in [0, 1]
    z       = adapter.encode(images, generator)                       # VAE posterior sample (training data)
    v       = adapter.model_output_at(x, t, cond)                     # one timestep per sample, t [B] (training)

Latents are always unpacked ``[B, C, h, w]`` (Flux packs them into tokens inside its denoiser call).
The scheduler math is written out (DDIM for SD/SDXL, flow-matching Euler for Flux/Z-Image) instead of
calling the stateful ``scheduler.step``, so that any step can be taken in any order, with or without
a graph; the tests check it against the pipeline's own ``__call__``.

A VAE whose config sets ``force_upcast`` (SDXL's, SD's) decodes and encodes in float32, never under
float16 autocast, as StableDiffusionXLPipeline does.

LoRA goes on ``adapter.denoiser`` only; the base weights and all other components are frozen.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import DiffusionPipeline
from diffusers.training_utils import cast_training_params
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
LORA_FAMILY_FILE = "zr_lora.json"  # records which family (pipeline class) a saved LoRA belongs to
ADAPTER_NAME = "default"


@dataclass
class Conditioning:
    """Encoded prompts of one batch. Families add their tensors in a subclass."""

    prompts: list[str]
    guidance_scale: float

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


@dataclass
class StepOutput:
    """One denoising step: the latents after the step and the predicted clean latents at its start."""

    prev_latents: torch.Tensor  # [B, C, h, w]
    pred_x0: torch.Tensor  # [B, C, h, w]


class T2IAdapter(ABC):
    """Base of the per-family adapters; see the module docstring for the protocol."""

    family: ClassVar[str]
    pipeline_classes: ClassVar[tuple[str, ...]]  # model_index.json `_class_name`s this adapter loads
    denoiser_name: ClassVar[str]  # pipeline attribute LoRA goes on: "unet" or "transformer"
    default_lora_targets: ClassVar[tuple[str, ...]]
    # A saved LoRA's keys all start with "<denoiser_name>." and name one of these blocks.
    lora_key_markers: ClassVar[tuple[str, ...]]

    def __init__(self, pipe: DiffusionPipeline):
        if type(pipe).__name__ not in self.pipeline_classes:
            raise ValueError(
                f"{type(self).__name__} needs one of {list(self.pipeline_classes)}, got {type(pipe).__name__}"
            )
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
                module.eval()
        self.timesteps: torch.Tensor | None = None  # [T], set by set_timesteps
        # StableDiffusionXLPipeline decodes a float16 VAE in float32 when its config says force_upcast
        # (its float16 activations overflow into NaNs); the adapter keeps such a VAE in float32.
        if self._vae_force_upcast and pipe.vae.dtype == torch.float16:
            pipe.vae.to(torch.float32)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> T2IAdapter:
        """Load a pipeline from a local folder or a hub id (``trust_remote_code`` stays off)."""
        pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, trust_remote_code=False)
        return cls(pipe.to(device))

    # ------------------------------------------------------------------ components

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    @property
    def vae(self) -> torch.nn.Module:
        return self.pipe.vae

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    @property
    def dtype(self) -> torch.dtype:
        return self.denoiser.dtype

    @property
    def num_steps(self) -> int:
        return 0 if self.timesteps is None else len(self.timesteps)

    # ------------------------------------------------------------------ family-specific

    @abstractmethod
    def encode_prompts(
        self,
        prompts: list[str],
        negative_prompts: list[str] | None = None,
        guidance_scale: float | None = None,
    ) -> Conditioning:
        """Encode with the frozen text encoder(s); guidance follows the family pipeline's convention.

        guidance_scale None: ``default_guidance_scale()``.
        """

    @abstractmethod
    def default_guidance_scale(self) -> float:
        """The guidance scale the family's pipeline samples with when given none; a ValueError that
        says what to choose where the family has no single sensible value."""

    @abstractmethod
    def set_timesteps(self, num_steps: int, height: int, width: int) -> torch.Tensor:
        """Set and return the T sampling timesteps (flow families shift them by image size)."""

    @abstractmethod
    def _guided_output(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """One denoiser call, guidance applied, sample b at ``timesteps[b]``. [B, C, h, w], [B] -> [B, C, h, w]."""

    @abstractmethod
    def step(self, model_output: torch.Tensor, t_index: int, latents: torch.Tensor) -> StepOutput:
        """Scheduler update of ``latents`` at step ``t_index`` given the guided model output."""

    @abstractmethod
    def renoise(self, x0: torch.Tensor, t_index: int, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to the noise level of step ``t_index`` (the input of that step)."""

    @abstractmethod
    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Shape of the initial latents for images of ``height`` x ``width`` pixels."""

    @abstractmethod
    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Map denoiser latents to the VAE decoder's input space."""

    # ------------------------------------------------------------------ shared

    def initial_latents(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Gaussian starting latents, drawn the way the pipeline draws them. [B, C, h, w] float32."""
        shape = self.latent_shape(batch, height, width)
        return randn_tensor(shape, generator=generator, device=self.device, dtype=torch.float32)

    def model_output(self, latents: torch.Tensor, t_index: int, cond: Conditioning) -> torch.Tensor:
        """The guided denoiser output at sampling step ``t_index``. [B, C, h, w] -> [B, C, h, w]."""
        self._check_t_index(t_index)
        return self._guided_output(latents, self.timesteps[t_index].expand(latents.shape[0]), cond)

    def model_output_at(
        self, latents: torch.Tensor, timesteps: torch.Tensor, cond: Conditioning
    ) -> torch.Tensor:
        """The guided denoiser output with one timestep per sample (training losses draw them).

        latents [B, C, h, w], timesteps [B] in the scheduler's units (DDPM: integer t; flow matching:
        σ · num_train_timesteps); needs no ``set_timesteps``. Returns [B, C, h, w].
        """
        if timesteps.shape != (latents.shape[0],):
            raise ValueError(
                f"timesteps must be [B] = [{latents.shape[0]}], one per sample, got {tuple(timesteps.shape)}"
            )
        out = self._guided_output(latents, timesteps.to(self.device), cond)
        if out.shape != latents.shape:
            raise RuntimeError(
                f"{self.family} denoiser output {tuple(out.shape)} != latents {tuple(latents.shape)}"
            )
        return out

    def denoise(self, latents: torch.Tensor, t_index: int, cond: Conditioning) -> StepOutput:
        """One denoising step (guidance included); differentiable w.r.t. the denoiser's parameters."""
        return self.step(self.model_output(latents, t_index, cond), t_index, latents)

    def denoise_step(self, latents: torch.Tensor, t_index: int, cond: Conditioning) -> torch.Tensor:
        return self.denoise(latents, t_index, cond).prev_latents

    def predict_x0(self, latents: torch.Tensor, t_index: int, cond: Conditioning) -> torch.Tensor:
        return self.denoise(latents, t_index, cond).pred_x0

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE decode. [B, C, h, w] latents -> [B, 3, H, W] images in [0, 1]."""
        with self._vae_precision():
            z = self.unscale_latents(latents).to(self.vae.dtype)
            image = self.vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in about [-1, 1]
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """VAE encode: [B, 3, H, W] in [0, 1] -> [B, C, h, w] a posterior sample in the VAE's (unscaled)
        latent space, float32."""
        with self._vae_precision():
            pixels = (images * 2 - 1).to(self.device, self.vae.dtype)
            z = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        return z.float()

    @property
    def _vae_force_upcast(self) -> bool:
        return bool(getattr(self.vae.config, "force_upcast", False))

    def _vae_precision(self) -> contextlib.AbstractContextManager:
        """A force_upcast VAE never computes in float16: float16 autocast is switched off around it."""
        kind = self.device.type
        if (
            self._vae_force_upcast
            and torch.is_autocast_enabled(kind)
            and torch.get_autocast_dtype(kind) == torch.float16
        ):
            return torch.autocast(kind, enabled=False)
        return contextlib.nullcontext()

    def _guidance(self, guidance_scale: float | None) -> float:
        return self.default_guidance_scale() if guidance_scale is None else float(guidance_scale)

    def _check_t_index(self, t_index: int) -> None:
        if self.timesteps is None:
            raise RuntimeError("call set_timesteps(num_steps, height, width) before denoising")
        if not 0 <= t_index < len(self.timesteps):
            raise IndexError(f"t_index {t_index} out of range; valid: 0..{len(self.timesteps) - 1}")

    @staticmethod
    def _check_prompts(prompts: list[str], negative_prompts: list[str] | None) -> None:
        if isinstance(prompts, str) or not prompts:
            raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        if negative_prompts is not None and len(negative_prompts) != len(prompts):
            raise ValueError(f"got {len(negative_prompts)} negative prompts for {len(prompts)} prompts")

    # ------------------------------------------------------------------ LoRA

    def add_lora(
        self, rank: int = 4, alpha: float | None = None, targets: tuple[str, ...] | None = None
    ) -> None:
        """Add a trainable LoRA (fp32 weights) to the denoiser; the base stays frozen.

        alpha defaults to rank (scale 1). targets are module-name suffixes, default ``default_lora_targets``.
        """
        if rank <= 0:
            raise ValueError(f"LoRA rank must be positive, got {rank}")
        targets = tuple(targets or self.default_lora_targets)
        names = [name for name, _ in self.denoiser.named_modules()]
        missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
        if missing:
            linear = sorted(
                {n.split(".")[-1] for n, m in self.denoiser.named_modules() if isinstance(m, torch.nn.Linear)}
            )
            raise ValueError(
                f"LoRA targets {missing} match no module of the {self.family} denoiser; Linear names: {linear}"
            )
        if ADAPTER_NAME in getattr(self.denoiser, "peft_config", {}):
            raise RuntimeError(f"the denoiser already has a LoRA named {ADAPTER_NAME!r}")
        config = LoraConfig(
            r=rank, lora_alpha=alpha or rank, target_modules=list(targets), init_lora_weights=True
        )
        self.denoiser.add_adapter(config, adapter_name=ADAPTER_NAME)
        cast_training_params(self.denoiser, dtype=torch.float32)

    def lora_parameters(self) -> list[torch.nn.Parameter]:
        """The trainable LoRA parameters (everything else is frozen)."""
        return [p for n, p in self.denoiser.named_parameters() if "lora_" in n and p.requires_grad]

    def save_lora(self, out_dir: str | Path) -> Path:
        """Save the LoRA in the diffusers format: a fresh ``pipe.load_lora_weights(out_dir)`` reads it.

        Files are written to a temporary folder inside ``out_dir`` and renamed into place.
        """
        config = getattr(self.denoiser, "peft_config", {}).get(ADAPTER_NAME)
        if config is None:
            raise RuntimeError("no LoRA to save: call add_lora (or load_lora) first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = get_peft_model_state_dict(self.denoiser, adapter_name=ADAPTER_NAME)
        record = {"family": self.family, "pipeline_class": type(self.pipe).__name__, "rank": config.r}
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-lora-") as tmp:
            type(self.pipe).save_lora_weights(
                tmp,
                **{
                    f"{self.denoiser_name}_lora_layers": state,
                    f"{self.denoiser_name}_lora_adapter_metadata": config.to_dict(),  # keeps alpha / rank
                },
                weight_name=LORA_WEIGHT_NAME,
                safe_serialization=True,
            )
            (Path(tmp) / LORA_FAMILY_FILE).write_text(json.dumps(record, indent=2))
            for name in (LORA_WEIGHT_NAME, LORA_FAMILY_FILE):
                os.replace(Path(tmp) / name, out / name)
        return out

    def load_lora(self, lora_dir: str | Path, trainable: bool = False) -> None:
        """Load a LoRA saved by ``save_lora`` (or another diffusers LoRA of this family) into the denoiser."""
        lora_dir = Path(lora_dir)
        weights = lora_dir / LORA_WEIGHT_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"no LoRA weights at {weights} (expected a folder written by save_lora)")
        family = lora_family(lora_dir)
        if family is not None and family != self.family:
            raise ValueError(
                f"LoRA at {lora_dir} belongs to family {family!r}; this adapter is {self.family!r} "
                f"({type(self.pipe).__name__})"
            )
        if family is None:
            self._check_lora_keys(weights)
        self.pipe.load_lora_weights(str(lora_dir), weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER_NAME)
        if trainable:
            for name, param in self.denoiser.named_parameters():
                if "lora_" in name:
                    param.requires_grad_(True)
            cast_training_params(self.denoiser, dtype=torch.float32)

    def _check_lora_keys(self, weights: Path) -> None:
        with safe_open(str(weights), framework="pt") as f:
            keys = list(f.keys())
        prefix = self.denoiser_name + "."
        bad = [k for k in keys if not (k.startswith(prefix) and any(m in k for m in self.lora_key_markers))]
        if bad:
            raise ValueError(
                f"LoRA at {weights.parent} does not look like a {self.family!r} LoRA (no {LORA_FAMILY_FILE}; "
                f"key {bad[0]!r} is not '{prefix}...' naming one of {list(self.lora_key_markers)})"
            )


def lora_family(lora_dir: str | Path) -> str | None:
    """The family recorded next to a LoRA saved by ``save_lora``; None when there is no record."""
    record = Path(lora_dir) / LORA_FAMILY_FILE
    if not record.is_file():
        return None
    return json.loads(record.read_text())["family"]
