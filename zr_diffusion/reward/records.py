"""Loading the reward recipes' train and eval records from their config (METHOD.md §1)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from zr_diffusion.data import ScoredRecord, load_records

if TYPE_CHECKING:
    from zr_diffusion.reward.config import TrainRewardConfig


# --------------------------------------------------------------------------------------------------
# data


def load_train_records(cfg: TrainRewardConfig, require_rationale: bool = False) -> list[ScoredRecord]:
    """``cfg.data.train`` validated against the grid and dimensions; no records is an error."""
    records = load_records(
        cfg.data.train,
        grid=cfg.grid.build(),
        dimensions=cfg.data.dimensions,
        skip_bad=cfg.data.skip_bad,
        require_rationale=require_rationale,
    )
    if not records:
        raise ValueError(f"data.train: {cfg.data.train} has no records; give at least one scored record")
    return records


def load_eval_records(cfg: TrainRewardConfig) -> list[ScoredRecord]:
    """``cfg.data.eval`` (first ``max_eval_records``), or ``[]`` when no eval split is given."""
    if not cfg.data.eval:
        return []
    records = load_records(
        cfg.data.eval, grid=cfg.grid.build(), dimensions=cfg.data.dimensions, skip_bad=cfg.data.skip_bad
    )
    return records[: cfg.data.max_eval_records] if cfg.data.max_eval_records is not None else records
