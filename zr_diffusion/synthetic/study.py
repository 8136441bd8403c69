"""The multi-seed study's statistics (issue 12 §2): confidence intervals and the verdict rule.

Pure functions, no I/O. Within one seed, a metric's CI is a **prompt-cluster bootstrap**: the test
prompts are resampled with replacement (all pairs of a drawn prompt come along), ``B`` times, with a
fixed RNG seed, and the percentile interval is reported. A difference between two models is
bootstrapped on the *same* resampled prompts (paired). Across seeds, the CI of a difference is a
**Student-t interval over the per-seed differences** (paired by seed: both models saw the same world),
floored by the sampling error the seeds' own CIs imply (:func:`seed_interval`).

Dimension names: P pairs, C prompt clusters, B bootstrap resamples, K seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal, NamedTuple

import numpy as np

__all__ = [
    "CONFIRMED",
    "CONTRADICTED",
    "NOT_SHOWN",
    "Interval",
    "StudySettings",
    "all_dimensions_verdict",
    "cluster_bootstrap",
    "hpa_interval",
    "hpa_difference_interval",
    "pair_outcomes",
    "pooled_hpa_interval",
    "simulated_half_width",
    "seed_interval",
    "student_t_quantile",
    "verdict",
]

CONFIRMED, NOT_SHOWN, CONTRADICTED = "Confirmed", "Not shown", "Contradicted"


@dataclass(frozen=True)
class StudySettings:
    """Fixed before the first study run; nothing here may be tuned toward a result.

    Verdict rule, for a claim "A > B" on the difference d = A − B with CI [lo, hi]:
    Confirmed when d > 0 and lo > 0; Contradicted when d < 0 and hi < 0; Not shown otherwise (the CI
    includes 0). For a claim "A close to B" (RISD vs its GDSO teacher): Confirmed when the CI lies
    inside (−close_margin, +close_margin); Contradicted when it lies entirely outside (lo ≥ margin or
    hi ≤ −margin); Not shown otherwise.
    """

    level: float = 0.95  # two-sided confidence level of every interval
    bootstrap_resamples: int = 2000  # B prompt-cluster resamples within a seed
    bootstrap_seed: int = 0  # RNG seed of the resampling (the same draws for every metric)
    close_margin: float = 0.03  # HPA: "close" means |d| < margin with confidence
    target_half_width: float = 0.03  # the target for a model's HPA CI pooled over the seeds
    min_clusters: int = 20  # fewer test prompts per seed: a percentile bootstrap is too narrow (warned)

    def __post_init__(self) -> None:
        if not 0.5 < self.level < 1:
            raise ValueError(f"study.level = {self.level}: give a confidence level in (0.5, 1), e.g. 0.95")
        if self.bootstrap_resamples < 100:
            raise ValueError(
                f"study.bootstrap_resamples = {self.bootstrap_resamples}: use at least 100 (2000 is usual)"
            )
        if not self.target_half_width > 0 or self.min_clusters < 2:
            raise ValueError(
                f"study.target_half_width = {self.target_half_width}, study.min_clusters = "
                f"{self.min_clusters}: need a half-width > 0 and at least 2 clusters"
            )
        if not self.close_margin > 0:
            raise ValueError(f"study.close_margin = {self.close_margin}: must be > 0 (an HPA difference)")


class Interval(NamedTuple):
    """A point estimate and its two-sided confidence interval."""

    estimate: float
    low: float
    high: float

    def cell(self, digits: int = 3) -> str:
        return f"{self.estimate:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


# --------------------------------------------------------------------------------------------------
# Eq. 17 per pair


def pair_outcomes(mu_w: Sequence[float], mu_l: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per pair (ŝ_w > ŝ_l, as from ``build_pairs``), Eq. 17's hit ``1[μ_w > μ_l]`` and the tie
    ``1[μ_w = μ_l]``, both ``[P]`` float. A tie counts as wrong in Eq. 17; ``hits + ties / 2`` is
    the "ties as half" reference."""
    w, lo = np.asarray(mu_w, dtype=np.float64), np.asarray(mu_l, dtype=np.float64)
    if w.shape != lo.shape or w.ndim != 1:
        raise ValueError(f"pair_outcomes: mu_w and mu_l must be 1-D of one length, got {w.shape}, {lo.shape}")
    return (w > lo).astype(np.float64), (w == lo).astype(np.float64)


# --------------------------------------------------------------------------------------------------
# within a seed: prompt-cluster bootstrap


def _percentile(draws: np.ndarray, level: float) -> tuple[float, float]:
    alpha = 1 - level
    lo, hi = np.quantile(draws, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def cluster_bootstrap(values: Sequence[float], clusters: Sequence[str], settings: StudySettings) -> Interval:
    """Pooled mean of ``values`` ``[P]`` with a prompt-cluster percentile bootstrap CI.

    Each resample draws C prompts with replacement from the C distinct ``clusters`` and pools all
    their pairs: statistic = Σ values / Σ pairs over the drawn prompts (a ratio, so prompts with more
    pairs weigh more, as in the pooled HPA). The RNG is ``numpy.default_rng(settings.bootstrap_seed)``.
    """
    v = np.asarray(values, dtype=np.float64)  # [P]
    if v.ndim != 1 or len(v) != len(clusters):
        raise ValueError(
            f"cluster_bootstrap: {len(v)} values for {len(clusters)} cluster labels; give one each"
        )
    if len(v) == 0:
        raise ValueError("cluster_bootstrap: no pairs; the test split has no pair with ŝ_a ≠ ŝ_b")
    names, index = np.unique(np.asarray(clusters, dtype=object).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=v, minlength=len(names))  # [C]
    counts = np.bincount(index, minlength=len(names)).astype(np.float64)  # [C]
    rng = np.random.default_rng(settings.bootstrap_seed)
    draw = rng.integers(0, len(names), size=(settings.bootstrap_resamples, len(names)))  # [B, C]
    stats = sums[draw].sum(1) / counts[draw].sum(1)  # [B]
    low, high = _percentile(stats, settings.level)
    return Interval(float(v.mean()), low, high)


def hpa_interval(mu_w, mu_l, prompts: Sequence[str], settings: StudySettings) -> Interval:
    """Eq. 17 HPA of one model over ``[P]`` pairs with its prompt-cluster CI."""
    hits, _ = pair_outcomes(mu_w, mu_l)
    return cluster_bootstrap(hits, prompts, settings)


def pooled_hpa_interval(
    per_seed: Sequence[tuple[Sequence[float], Sequence[float], Sequence[str]]], settings: StudySettings
) -> Interval:
    """Eq. 17 HPA pooled over the seeds' pairs, ``per_seed[k] = (mu_w, mu_l, prompts)`` each ``[P_k]``,
    with a prompt-cluster bootstrap over all seeds' prompts together (seed k's prompt p is the
    cluster ``k/p``: the worlds are independent, so equal prompt texts are different clusters)."""
    hits, clusters = [], []
    for k, (mu_w, mu_l, prompts) in enumerate(per_seed):
        h, _ = pair_outcomes(mu_w, mu_l)
        hits.append(h)
        clusters += [f"{k}/{p}" for p in prompts]
    return cluster_bootstrap(np.concatenate(hits) if hits else np.zeros(0), clusters, settings)


def simulated_half_width(
    clusters: int,
    pairs_per_cluster: int,
    accuracy: float,
    icc: float,
    settings: StudySettings,
    repeats: int = 20,
    seed: int = 0,
) -> float:
    """The mean half-width of :func:`cluster_bootstrap`'s CI of HPA over ``clusters`` prompts of
    ``pairs_per_cluster`` pairs each, on simulated outcomes (to size a test split).

    Each prompt's pair accuracy is drawn from a Beta with mean ``accuracy`` and intra-cluster
    correlation ``icc`` (Beta(a, b) with a + b = 1/icc − 1; ``icc = 0``: every prompt at ``accuracy``),
    its pairs' hits are Bernoulli of it; averaged over ``repeats`` simulated splits.
    """
    if not (0 < accuracy < 1 and 0 <= icc < 1 and clusters >= 2 and pairs_per_cluster >= 1):
        raise ValueError(
            f"simulated_half_width: needs 0 < accuracy < 1, 0 <= icc < 1, clusters >= 2, pairs >= 1; got "
            f"{accuracy}, {icc}, {clusters}, {pairs_per_cluster}"
        )
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(clusters), pairs_per_cluster).astype(str)  # [P]
    widths = []
    for _ in range(repeats):
        if icc > 0:
            n = 1 / icc - 1
            p = rng.beta(accuracy * n, (1 - accuracy) * n, size=clusters)  # [C]
        else:
            p = np.full(clusters, accuracy)
        hits = (rng.random((clusters, pairs_per_cluster)) < p[:, None]).astype(np.float64).ravel()  # [P]
        ci = cluster_bootstrap(hits, labels, settings)
        widths.append((ci.high - ci.low) / 2)
    return float(np.mean(widths))


def hpa_difference_interval(
    mu_w_a, mu_l_a, mu_w_b, mu_l_b, prompts: Sequence[str], settings: StudySettings
) -> Interval:
    """HPA(A) − HPA(B) on the same ``[P]`` pairs, bootstrapped on the same prompt resamples."""
    hits_a, _ = pair_outcomes(mu_w_a, mu_l_a)
    hits_b, _ = pair_outcomes(mu_w_b, mu_l_b)
    if hits_a.shape != hits_b.shape:
        raise ValueError(
            f"hpa_difference_interval: model A has {len(hits_a)} pairs, model B {len(hits_b)}; "
            "both must be scored on the same pairs"
        )
    return cluster_bootstrap(hits_a - hits_b, prompts, settings)


# --------------------------------------------------------------------------------------------------
# across seeds: Student-t interval of the paired per-seed differences


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF for t ≥ 0: 1/2 + ∫_0^t density, by composite Simpson (error < 1e-10 here)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    n = 4000  # even
    h = t / n
    xs = np.linspace(0.0, t, n + 1)
    f = np.exp(log_c - (df + 1) / 2 * np.log1p(xs * xs / df))
    weights = np.ones(n + 1)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    return 0.5 + float(h / 3 * (weights * f).sum())


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile of Student's t with ``df`` degrees of freedom, for p in [0.5, 1) (bisection)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"student_t_quantile: needs 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))  # Cauchy: exact
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def seed_interval(
    per_seed: Sequence[float], settings: StudySettings, within: Sequence[Interval] | None = None
) -> Interval:
    """Mean over K seeds of a per-seed value (e.g. HPA(A) − HPA(B) in each world) with the t-interval
    ``mean ± t_{1−α/2, K−1} · sd / √K`` (sd with K − 1 in the denominator). Needs K ≥ 2.

    ``within`` (each seed's own CI of that value) sets a floor: the half-width is never below
    ``z_{1−α/2} · √(Σ_k se_k²) / K``, the sampling error of the seed mean that the per-seed CIs
    alone imply (``se_k`` = CI width / 2z). With a few seeds and a discrete statistic the per-seed
    values can coincide (sd = 0), and the t-interval alone would then claim certainty it does not have.
    """
    d = np.asarray(per_seed, dtype=np.float64)  # [K]
    if d.ndim != 1 or len(d) < 2:
        raise ValueError(f"seed_interval: needs at least 2 seeds for an across-seed CI, got {d.size}")
    mean = float(d.mean())
    half = (
        student_t_quantile(1 - (1 - settings.level) / 2, len(d) - 1)
        * float(d.std(ddof=1))
        / math.sqrt(len(d))
    )
    if within is not None:
        if len(within) != len(d):
            raise ValueError(f"seed_interval: {len(within)} per-seed CIs for {len(d)} seeds; give one each")
        z = NormalDist().inv_cdf(1 - (1 - settings.level) / 2)
        se = np.array([(ci.high - ci.low) / (2 * z) for ci in within])  # [K]
        half = max(half, z * math.sqrt(float((se**2).sum())) / len(d))
    return Interval(mean, mean - half, mean + half)


# --------------------------------------------------------------------------------------------------
# the verdict rule (StudySettings docstring)


def verdict(interval: Interval, claim: Literal["greater", "close"], settings: StudySettings) -> str:
    """Confirmed / Not shown / Contradicted for a claim on a difference (rule: StudySettings)."""
    d, lo, hi = interval
    if claim == "greater":
        if d > 0 and lo > 0:
            return CONFIRMED
        if d < 0 and hi < 0:
            return CONTRADICTED
        return NOT_SHOWN
    if claim == "close":
        m = settings.close_margin
        if -m < lo and hi < m:
            return CONFIRMED
        if lo >= m or hi <= -m:
            return CONTRADICTED
        return NOT_SHOWN
    raise ValueError(f"verdict: claim must be 'greater' or 'close', got {claim!r}")


def all_dimensions_verdict(verdicts: Sequence[str]) -> str:
    """ "No dimension of A below B", from each dimension's "A > B" verdict: Contradicted when any
    dimension is Contradicted (A significantly below), Confirmed when every dimension is Confirmed,
    Not shown otherwise. (Strict: a dimension merely not shown to be below does not confirm.)"""
    if not verdicts:
        raise ValueError("all_dimensions_verdict: no dimensions")
    if CONTRADICTED in verdicts:
        return CONTRADICTED
    return CONFIRMED if all(v == CONFIRMED for v in verdicts) else NOT_SHOWN
