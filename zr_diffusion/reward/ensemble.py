"""Reward ensembles: several frozen Z-Reward models combined into one conservative reward.

Each member is a ``ZRewardModel`` with its own processor (preprocessing, pixel budget) and makes one
vision pass per image, shared by all its dimensions. Every member scores the same dimensions with the
same weights; their rewards ``r_m = Σ_d w_d μ_{m,d}`` are combined per image by ``aggregate_rewards``.
Optimising the minimum or a lower confidence bound of an ensemble resists reward over-optimisation
better than optimising one model (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from zr_diffusion.reward.model import ZRewardModel

AGGREGATES = ("mean", "min", "mean_minus_std")


def aggregate_rewards(rewards: torch.Tensor, how: str, std_weight: float = 1.0) -> torch.Tensor:
    """Combine member rewards ``[B, M]`` into ``[B]``.

    - ``mean``: ``(1/M) Σ_m r_m``
    - ``min``: ``min_m r_m`` (the gradient goes to the lowest member)
    - ``mean_minus_std``: ``mean_m r_m − std_weight · std_m r_m``, the sample standard deviation
      (divisor ``M − 1``); where all members agree the std and its gradient are 0.
    """
    if rewards.ndim != 2:
        raise ValueError(f"aggregate_rewards: rewards must be [B, M], got shape {tuple(rewards.shape)}")
    if how == "mean":
        return rewards.mean(1)
    if how == "min":
        return rewards.min(1).values
    if how == "mean_minus_std":
        if rewards.shape[1] < 2:
            raise ValueError("aggregate_rewards: mean_minus_std needs at least 2 members")
        var = rewards.var(1)  # [B], divisor M − 1
        safe = torch.where(var > 0, var, torch.ones_like(var))  # sqrt'(0) is infinite: keep it off the graph
        std = torch.where(var > 0, safe.sqrt(), torch.zeros_like(var))
        return rewards.mean(1) - std_weight * std
    raise ValueError(f"aggregate_rewards: unknown aggregate {how!r}; valid: {list(AGGREGATES)}")


class EnsembleOutput(NamedTuple):
    mu: torch.Tensor  # [B, D] expected score per dimension, mean over members
    probs: torch.Tensor  # [B, D, S] score distribution, mean over members
    reward: torch.Tensor  # [B] aggregate of the member rewards
    members: torch.Tensor  # [B, M] each member's reward


class ZRewardEnsemble(nn.Module):
    """Frozen Z-Reward models ``m = 1..M`` on the same dimensions; reward = ``aggregate_rewards``."""

    def __init__(self, members: Sequence[ZRewardModel], aggregate: str = "mean", std_weight: float = 1.0):
        super().__init__()
        if not members:
            raise ValueError("a reward ensemble needs at least one member")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")
        if aggregate == "mean_minus_std" and len(members) < 2:
            raise ValueError(f"aggregate 'mean_minus_std' needs at least 2 members, got {len(members)}")
        if std_weight < 0:
            raise ValueError(f"std_weight must be >= 0, got {std_weight}")
        dims = {tuple(m.dimensions) for m in members}
        if len(dims) != 1:
            raise ValueError(f"every ensemble member must score the same dimensions, got {sorted(dims)}")
        self.members = nn.ModuleList(members)
        self.dimensions = members[0].dimensions
        self.aggregate = aggregate
        self.std_weight = float(std_weight)

    @classmethod
    def from_pretrained(
        cls, paths: Sequence[str | Path], aggregate: str = "mean", std_weight: float = 1.0, **member_kwargs
    ) -> ZRewardEnsemble:
        """Load every member (local folder or hub id) as a frozen ``ZRewardModel``; ``member_kwargs``
        (dimensions, weights, grid, dtype, device, trust_remote_code) go to each member's
        ``ZRewardModel.from_pretrained``."""
        members = [ZRewardModel.from_pretrained(p, **member_kwargs) for p in paths]
        return cls(members, aggregate=aggregate, std_weight=std_weight)

    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> EnsembleOutput:
        """Score ``images [B, 3, H, W]`` in [0, 1] with every member; gradients flow to the images."""
        outs = [m(images, prompts) for m in self.members]
        members = torch.stack([o.reward for o in outs], 1)  # [B, M]
        mu = torch.stack([o.mu for o in outs]).mean(0)  # [B, D]
        probs = torch.stack([o.probs for o in outs]).mean(0)  # [B, D, S]
        reward = aggregate_rewards(members, self.aggregate, self.std_weight)  # [B]
        return EnsembleOutput(mu, probs, reward, members)
