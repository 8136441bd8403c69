"""Judging generators in the synthetic world with the ORACLE, never with a learned model (``zr demo``).

Every variant (base, SFT, Z-Reward) generates the same held-out (prompt, seed) items from identical
noise (:func:`pipelines.evaluate.generate`). Each image is scored from pixels by the analytic oracle
(:func:`synthetic.oracle_scores`: a true score per rubric dimension given the prompt's scene), and
GSB verdicts come from oracle *annotators*: raters drawn from the world's annotator population
(personal bias + per-annotation noise, half-point grid) who each annotate both images of an item and
compare their aggregates with the world's tie margin (:func:`synthetic.judge`); an item's verdict is
the majority of its raters (a tie between G and B votes is S).

The reward that the generator was tuned on (the RISD student) is scored too, next to the oracle:
a reward that rises while the oracle's scores do not is reward hacking, and shows here.

Dimension names: N items, D rubric dimensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.scores import ScoreGrid
from zr_diffusion.synthetic.annotators import aggregate, annotate_scores, judge, make_annotators
from zr_diffusion.synthetic.oracle import oracle_scores
from zr_diffusion.synthetic.world import Scene, WorldConfig

_RATER_STREAM = 77_001  # the GSB raters' random stream (the dataset's annotators use other streams)


@dataclass(frozen=True)
class Variant:
    """One generator: a pipeline folder and an optional LoRA folder on top of it."""

    label: str
    pipeline: str
    lora: str | None = None


@torch.no_grad()
def generate_variant(variant: Variant, prompts: list[str], seeds: Sequence[int], sampler, batch_size: int):
    """Images ``[len(seeds) · P, 3, H, W]`` of one variant, seed-major (noise depends on the seed only)."""
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.evaluate import generate

    adapter = load_adapter(variant.pipeline)
    if variant.lora is not None:
        adapter.load_lora(variant.lora)
    return generate(adapter, prompts, tuple(seeds), sampler, batch_size).float().clamp(0, 1)


def oracle_table(images: torch.Tensor, scenes: Sequence[Scene]) -> list[dict[str, float]]:
    """The oracle's true score per dimension of every image (images and scenes item-aligned)."""
    return [oracle_scores(img, scene) for img, scene in zip(images, scenes)]


def majority(votes: Sequence[str]) -> str:
    g, b = votes.count("G"), votes.count("B")
    return "G" if g > b else "B" if b > g else "S"


def rater_verdicts(
    true_a: Sequence[dict[str, float]],
    true_b: Sequence[dict[str, float]],
    world: WorldConfig,
    raters_per_item: int,
    seed: int,
    label: str,
) -> list[dict]:
    """Per item: each of ``raters_per_item`` oracle annotators annotates A and B (same rater for both)
    and judges A against B; the item's verdict is their majority. Deterministic in ``(seed, label)``."""
    grid = ScoreGrid()
    salt = int.from_bytes(label.encode()[:8].ljust(8, b"\0"), "little") % (2**31)
    rng = np.random.default_rng([seed, _RATER_STREAM, salt])
    pool = make_annotators(world, np.random.default_rng([seed, _RATER_STREAM]))
    out = []
    for a, b in zip(true_a, true_b):
        idx = rng.choice(len(pool), size=raters_per_item, replace=False)
        votes, notes = [], []
        for i in idx:
            rater = [pool[int(i)]]
            ann_a = {d: s[0] for d, s in annotate_scores(a, rater, 1, rng, grid).items()}
            ann_b = {d: s[0] for d, s in annotate_scores(b, rater, 1, rng, grid).items()}
            votes.append(judge(ann_a, ann_b, tie_margin=world.judge_tie_margin))
            notes.append(
                {"rater": int(i), "a": aggregate(ann_a), "b": aggregate(ann_b), "verdict": votes[-1]}
            )
        out.append({"verdict": majority(votes), "votes": votes, "raters": notes})
    return out


def gsb_counts(verdicts: Sequence[str]) -> dict:
    from zr_diffusion.pipelines.gsb import gsb

    result = gsb(list(verdicts))
    return {"good": result.good, "same": result.same, "bad": result.bad, "gsb": result.gsb}


@torch.no_grad()
def reward_table(
    model_dir: str, images: torch.Tensor, prompts: Sequence[str], batch_size: int
) -> torch.Tensor:
    """The tuned-on reward (RISD student) μ per dimension of every image: ``[N, D]``."""
    from zr_diffusion.reward.model import ZRewardModel

    model = ZRewardModel.from_pretrained(model_dir, dimensions=tuple(DIMENSIONS))
    mus = []
    for start in range(0, len(images), batch_size):
        mus.append(model(images[start : start + batch_size], list(prompts[start : start + batch_size])).mu)
    return torch.cat(mus).float()


def mean_by_dimension(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    out = {d: float(np.mean([r[d] for r in rows])) for d in DIMENSIONS}
    out["aggregate"] = float(np.mean([aggregate(r) for r in rows]))
    return out


def save_items(path: str | Path, images: torch.Tensor) -> None:
    """The generated images of one variant as a uint8 tensor file (for the report's grid)."""
    from safetensors.torch import save_file

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({"images": (images * 255).round().to(torch.uint8).contiguous()}, str(path))


def load_items(path: str | Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(path))["images"].float() / 255


__all__ = [
    "Variant",
    "generate_variant",
    "gsb_counts",
    "load_items",
    "majority",
    "mean_by_dimension",
    "oracle_table",
    "rater_verdicts",
    "reward_table",
    "save_items",
]
