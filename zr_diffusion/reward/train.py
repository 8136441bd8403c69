"""``zr train-reward``: one command for the six reward methods (METHOD.md §2–4).

The method name picks the recipe from one explicit table; each recipe is a plain function taking
:class:`~zr_diffusion.reward.config.TrainRewardConfig`. Recipe modules are imported only when their
method runs.
"""

from __future__ import annotations

import importlib

from zr_diffusion.reward.config import METHODS, TrainRewardConfig

RECIPES: dict[str, str] = {
    "gdso": "zr_diffusion.reward.gdso:train_gdso",
    "grpo": "zr_diffusion.reward.gdso:train_grpo",
    "sft": "zr_diffusion.reward.baselines.sft:train_sft",
    "rewarddance": "zr_diffusion.reward.baselines.rewarddance:train_rewarddance",
    "risd": "zr_diffusion.reward.risd:train_risd",
    "opd": "zr_diffusion.reward.baselines.opd:train_opd",
}
assert set(RECIPES) == set(METHODS), "every method of reward.config.METHODS needs a recipe"


def recipe_for(method: str):
    """The recipe function of ``method``; an unknown method is an error listing the valid ones."""
    if method not in RECIPES:
        raise ValueError(f"unknown reward method {method!r}; valid methods: {list(RECIPES)}")
    module, name = RECIPES[method].split(":")
    return getattr(importlib.import_module(module), name)


def train_reward(cfg: TrainRewardConfig):
    """Train a reward model with ``cfg.method``; returns what the recipe returns (a TrainResult)."""
    return recipe_for(cfg.method)(cfg)
