"""Oracle annotators and the GSB judge of the synthetic world.

An annotator has a personal bias (drawn once) and per-annotation noise. Shown an item whose true
score is ``s`` (the latent score of a rendered image, or :func:`oracle_scores` of a generated one),
it answers ``nearest_bin(s + bias + ε)``, ``ε ~ N(0, noise_std²)``: the value rounded to the
half-point grid and clipped to [1, 5] (``ScoreGrid.nearest_bin``). Training items get one
annotation from a random annotator; val / test items get K annotations from K different
annotators, whose ground truth is ``scores.aggregate_annotators`` (trimmed mean).

The judge compares two images of the same prompt by the weighted mean of their per-dimension
scores and answers "G" / "S" / "B" (the verdicts of ``zr_diffusion.pipelines.gsb``) with a tie
margin; its own noise blurs close calls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from zr_diffusion.scores import ScoreGrid
from zr_diffusion.synthetic.oracle import oracle_scores
from zr_diffusion.synthetic.world import Scene, WorldConfig

Verdict = Literal["G", "S", "B"]


@dataclass(frozen=True)
class Annotator:
    id: int
    bias: float  # added to every score this annotator gives
    noise_std: float  # std of the per-annotation noise


def make_annotators(cfg: WorldConfig, rng: np.random.Generator) -> list[Annotator]:
    """The pool of ``cfg.num_annotators`` annotators, biases ~ N(0, annotator_bias_std²)."""
    biases = rng.normal(0.0, cfg.annotator_bias_std, size=cfg.num_annotators)
    return [Annotator(i, float(b), cfg.annotator_noise_std) for i, b in enumerate(biases)]


def annotate(annotator: Annotator, true_score: float, rng: np.random.Generator, grid: ScoreGrid) -> float:
    """One annotation: ``true_score + bias + noise`` on the grid, clipped to [s_min, s_max]."""
    return grid.nearest_bin(true_score + annotator.bias + rng.normal(0.0, annotator.noise_std))


def pick_annotators(annotators: Sequence[Annotator], k: int, rng: np.random.Generator) -> list[Annotator]:
    """``k`` different annotators, uniformly at random."""
    if not 1 <= k <= len(annotators):
        raise ValueError(f"need 1 <= k <= {len(annotators)} annotators, got k={k}")
    return [annotators[i] for i in rng.choice(len(annotators), size=k, replace=False)]


def annotate_scores(
    true_scores: Mapping[str, float],
    annotators: Sequence[Annotator],
    k: int,
    rng: np.random.Generator,
    grid: ScoreGrid,
) -> dict[str, tuple[float, ...]]:
    """K annotations per dimension of one image, from the same K annotators for every dimension."""
    chosen = pick_annotators(annotators, k, rng)
    return {dim: tuple(annotate(a, s, rng, grid) for a in chosen) for dim, s in true_scores.items()}


def annotate_image(
    image,
    scene: Scene,
    annotators: Sequence[Annotator],
    k: int,
    rng: np.random.Generator,
    grid: ScoreGrid | None = None,
) -> dict[str, tuple[float, ...]]:
    """K oracle annotations per dimension of any image ``[3, H, W]`` (e.g. a generated one) for
    the prompt of ``scene``: the true score is :func:`oracle_scores`."""
    return annotate_scores(oracle_scores(image, scene), annotators, k, rng, grid or ScoreGrid())


def aggregate(scores: Mapping[str, float], weights: Mapping[str, float] | None = None) -> float:
    """Weighted mean over dimensions (uniform by default), METHOD.md §6's default aggregation."""
    w = {d: 1.0 for d in scores} if weights is None else {d: float(weights[d]) for d in scores}
    if any(v < 0 for v in w.values()) or sum(w.values()) <= 0:
        raise ValueError(f"weights must be non-negative and not all 0, got {weights}")
    return sum(scores[d] * w[d] for d in scores) / sum(w.values())


def judge(
    scores_a: Mapping[str, float],
    scores_b: Mapping[str, float],
    *,
    tie_margin: float = 0.25,
    weights: Mapping[str, float] | None = None,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Verdict:
    """ "G" if A's aggregate beats B's by more than ``tie_margin``, "B" if B's beats A's, else "S".

    With ``noise_std > 0`` each image's per-dimension score gets independent judge noise first.
    """
    if set(scores_a) != set(scores_b):
        raise ValueError(f"judge: dimensions differ, {sorted(scores_a)} vs {sorted(scores_b)}")
    if tie_margin < 0 or noise_std < 0:
        raise ValueError(f"tie_margin and noise_std must be >= 0, got {tie_margin}, {noise_std}")
    if noise_std > 0:
        if rng is None:
            raise ValueError("judge: a noisy judge (noise_std > 0) needs an rng")
        scores_a = {d: s + rng.normal(0.0, noise_std) for d, s in scores_a.items()}
        scores_b = {d: s + rng.normal(0.0, noise_std) for d, s in scores_b.items()}
    diff = aggregate(scores_a, weights) - aggregate(scores_b, weights)
    return "G" if diff > tie_margin else "B" if diff < -tie_margin else "S"


def judge_images(
    image_a,
    image_b,
    scene: Scene,
    *,
    tie_margin: float = 0.25,
    weights: Mapping[str, float] | None = None,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> Verdict:
    """GSB verdict for image A against image B ``[3, H, W]`` of the prompt of ``scene``, from their
    :func:`oracle_scores`."""
    return judge(
        oracle_scores(image_a, scene),
        oracle_scores(image_b, scene),
        tie_margin=tie_margin,
        weights=weights,
        noise_std=noise_std,
        rng=rng,
    )
