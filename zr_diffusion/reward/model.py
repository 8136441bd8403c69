"""The deployed differentiable reward: a frozen RISD student read in student mode (METHOD.md §3, §6).

``ZRewardModel(images, prompts)`` scores every image on every rubric dimension with one vision pass
per image and one language-model batch of B x D sequences, and aggregates the per-dimension expected
scores ``μ`` into a scalar reward by a weighted mean. Gradients flow to the images only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from zr_diffusion.rubric import DEFAULT_DIMENSIONS, check_dimensions
from zr_diffusion.scores import ScoreGrid, expected_score, score_distribution
from zr_diffusion.vlm.checkpointing import checkpoint_layers as vlm_checkpoint_layers
from zr_diffusion.vlm.loading import load_vlm
from zr_diffusion.vlm.preprocess import VisionSpec, with_pixel_budget
from zr_diffusion.vlm.readout import VLMScorer


class RewardOutput(NamedTuple):
    mu: torch.Tensor  # [B, D] expected score per dimension
    probs: torch.Tensor  # [B, D, S] score distribution per dimension
    reward: torch.Tensor  # [B] weighted mean of mu over dimensions


def normalized_weights(weights: Sequence[float] | None, dimensions: Sequence[str]) -> torch.Tensor:
    """Dimension weights ``[D]`` summing to one; default equal. Invalid weights are an error."""
    d = len(dimensions)
    if weights is None:
        return torch.full((d,), 1.0 / d)
    values = [float(w) for w in weights]
    if len(values) != d:
        raise ValueError(
            f"got {len(values)} weights {values} for {d} dimensions {list(dimensions)}; give one per dimension"
        )
    if any(not np.isfinite(w) or w < 0 for w in values):
        raise ValueError(f"dimension weights must be finite and non-negative, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"dimension weights must not all be zero, got {values}")
    return torch.tensor([w / total for w in values])


class ZRewardModel(nn.Module):
    """Frozen VLM reward ``R(p, I) = Σ_d w_d μ(p, I, d)`` with gradients to the image pixels.

    The VLM stays in eval mode and no parameter requires grad, also after ``.train()``.
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        dimensions: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        grid: ScoreGrid | None = None,
        max_pixels: int | None = None,
        checkpoint_layers: bool = False,
    ):
        """``max_pixels``: the reward's pixel budget (None = its processor's); images are resized to it on
        the differentiable path. ``checkpoint_layers``: recompute each VLM layer in backward (less memory)."""
        super().__init__()
        self.vlm = model
        self.processor = processor
        self.dimensions = check_dimensions(dimensions if dimensions is not None else DEFAULT_DIMENSIONS)
        self.grid = grid if grid is not None else ScoreGrid()
        spec = with_pixel_budget(VisionSpec.from_processor(processor), max_pixels)
        self.scorer = VLMScorer(model, processor, self.grid, spec=spec)
        if checkpoint_layers:
            vlm_checkpoint_layers(model)
        self.register_buffer("weights", normalized_weights(weights, self.dimensions), persistent=False)  # [D]
        self.vlm.requires_grad_(False)
        self.vlm.eval()

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dimensions: Sequence[str] | None = None,
        weights: Sequence[float] | None = None,
        grid: ScoreGrid | None = None,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        trust_remote_code: bool = False,
        max_pixels: int | None = None,
        checkpoint_layers: bool = False,
    ) -> ZRewardModel:
        """Load a student VLM (local folder or hub id) as a frozen reward model."""
        model, processor = load_vlm(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        reward = cls(
            model,
            processor,
            dimensions=dimensions,
            weights=weights,
            grid=grid,
            max_pixels=max_pixels,
            checkpoint_layers=checkpoint_layers,
        )
        return reward.to(device) if device is not None else reward

    def train(self, mode: bool = True) -> ZRewardModel:
        """Switch the module's mode; the VLM itself always stays in eval mode."""
        super().train(mode)
        self.vlm.eval()
        return self

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> RewardOutput:
        """Score ``images [B, 3, H, W]`` in [0, 1] (one size per batch) against one prompt each."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a [B, 3, H, W] tensor in [0, 1], got shape {tuple(images.shape)}"
            )
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {len(prompts)} prompts for {images.shape[0]} images; give one prompt per image"
            )
        logits = self.scorer(images, list(prompts), self.dimensions, mode="student")  # [B, D, S]
        probs = score_distribution(logits)  # [B, D, S]
        mu = expected_score(probs, self.grid.values(device=probs.device, dtype=probs.dtype))  # [B, D]
        reward = mu @ self.weights.to(mu.dtype)  # [B]
        return RewardOutput(mu, probs, reward)

    @torch.no_grad()
    def score_pil(self, images: Sequence, prompts: Sequence[str]) -> RewardOutput:
        """Score PIL images (any sizes); images of one size are batched together."""
        if len(prompts) != len(images):
            raise ValueError(
                f"got {len(prompts)} prompts for {len(images)} images; give one prompt per image"
            )
        tensors = [pil_to_tensor(img) for img in images]
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(tensors):
            by_size.setdefault(tuple(t.shape[-2:]), []).append(i)
        mu = probs = reward = None
        for idx in by_size.values():
            out = self(torch.stack([tensors[i] for i in idx]), [prompts[i] for i in idx])
            if mu is None:
                mu = out.mu.new_empty(len(images), *out.mu.shape[1:])
                probs = out.probs.new_empty(len(images), *out.probs.shape[1:])
                reward = out.reward.new_empty(len(images))
            mu[idx], probs[idx], reward[idx] = out.mu, out.probs, out.reward
        return RewardOutput(mu, probs, reward)


def pil_to_tensor(image) -> torch.Tensor:
    """A PIL image (any mode) -> ``[3, H, W]`` float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
