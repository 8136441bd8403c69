"""The study's statistics (zr_diffusion/synthetic/study.py): hand-computed values."""

import json
import math

import numpy as np
import pytest

from zr_diffusion.reward.evaluate import hpa
from zr_diffusion.synthetic.study import (
    CONFIRMED,
    CONTRADICTED,
    NOT_SHOWN,
    Interval,
    StudySettings,
    all_dimensions_verdict,
    cluster_bootstrap,
    hpa_difference_interval,
    hpa_interval,
    pair_outcomes,
    pooled_hpa_interval,
    seed_interval,
    simulated_half_width,
    student_t_quantile,
    verdict,
)
from zr_diffusion.synthetic.study_report import generator_study_markdown, reward_study_markdown

S = StudySettings()


def test_pair_outcomes_follow_eq17_ties_wrong():
    hits, ties = pair_outcomes([2.0, 1.0, 3.0], [1.0, 1.0, 4.0])
    assert hits.tolist() == [1.0, 0.0, 0.0]
    assert ties.tolist() == [0.0, 1.0, 0.0]


def test_hpa_interval_estimate_equals_eq17_hpa():
    rng = np.random.default_rng(1)
    mu_w, mu_l = rng.normal(size=40).round(1), rng.normal(size=40).round(1)  # some ties
    prompts = [f"p{i % 7}" for i in range(40)]
    got = hpa_interval(mu_w, mu_l, prompts, S)
    assert got.estimate == pytest.approx(hpa(mu_w, mu_l, [2.0] * 40, [1.0] * 40))
    assert got.low <= got.estimate <= got.high


def test_bootstrap_of_equal_clusters_has_zero_width():
    # prompt a: hits (1, 0), prompt b: (0, 1): every resample pools to 0.5
    assert cluster_bootstrap([1, 0, 0, 1], ["a", "a", "b", "b"], S) == Interval(0.5, 0.5, 0.5)


def test_bootstrap_resamples_prompts_not_pairs():
    # a: (1, 1), b: (0, 0). Prompt resamples give 0, 0.5, 1 with probability 1/4, 1/2, 1/4, so the
    # 2.5% and 97.5% percentiles are 0 and 1. (Resampling the 4 pairs would give P(0) = 1/256.)
    assert cluster_bootstrap([1, 1, 0, 0], ["a", "a", "b", "b"], S) == Interval(0.5, 0.0, 1.0)


def test_bootstrap_width_matches_the_cluster_mean_standard_error():
    # 40 prompts of 5 pairs, prompt means m_c: the bootstrap SD of the pooled mean is sd_pop(m)/sqrt(C)
    rng = np.random.default_rng(0)
    means = rng.uniform(0.2, 0.9, size=40)
    values = np.repeat(means, 5)
    prompts = [f"p{c}" for c in range(40) for _ in range(5)]
    got = cluster_bootstrap(values, prompts, StudySettings(bootstrap_resamples=8000))
    expected_half = 1.959964 * means.std() / math.sqrt(40)
    assert (got.high - got.low) / 2 == pytest.approx(expected_half, rel=0.08)


def test_bootstrap_is_seeded_and_paired():
    rng = np.random.default_rng(2)
    mu_w, mu_l = rng.normal(size=30), rng.normal(size=30)
    prompts = [f"p{i % 6}" for i in range(30)]
    assert hpa_interval(mu_w, mu_l, prompts, S) == hpa_interval(mu_w, mu_l, prompts, S)
    values, labels = rng.normal(size=30), [f"p{i}" for i in range(30)]  # continuous: seeds tell apart
    assert cluster_bootstrap(values, labels, S) == cluster_bootstrap(values, labels, S)
    assert cluster_bootstrap(values, labels, S) != cluster_bootstrap(
        values, labels, StudySettings(bootstrap_seed=1)
    )
    # the same model twice: every paired resample differs by exactly 0
    assert hpa_difference_interval(mu_w, mu_l, mu_w, mu_l, prompts, S) == Interval(0.0, 0.0, 0.0)


def test_hpa_difference_on_same_pairs():
    # A right on all 4 pairs; B right on prompt b's pairs only: per-pair d = (1, 1, 0, 0)
    prompts = ["a", "a", "b", "b"]
    got = hpa_difference_interval([1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], prompts, S)
    assert got == Interval(0.5, 0.0, 1.0)
    with pytest.raises(ValueError, match="same pairs"):
        hpa_difference_interval([1, 1], [0, 0], [1], [0], ["a", "a"], S)


def test_student_t_quantile_closed_forms_and_scipy():
    assert student_t_quantile(0.975, 1) == pytest.approx(12.706205, abs=1e-6)
    # df = 2: t = (2p − 1) / sqrt(2p(1 − p)) = 0.95 / sqrt(0.04875)
    assert student_t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(0.04875), abs=1e-7)
    stats = pytest.importorskip("scipy.stats")
    for df in (3, 4, 9, 30):
        assert student_t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-7)


def test_seed_interval_is_the_t_interval_of_the_differences():
    # d = (0.1, 0.2, 0.3): mean 0.2, sd 0.1, half = t_{.975,2} · 0.1 / sqrt(3) = 4.302653 · 0.057735
    got = seed_interval([0.1, 0.2, 0.3], S)
    half = 0.95 / math.sqrt(0.04875) * 0.1 / math.sqrt(3)
    assert got.estimate == pytest.approx(0.2)
    assert (got.low, got.high) == pytest.approx((0.2 - half, 0.2 + half))
    assert half == pytest.approx(0.248414, abs=1e-6)
    with pytest.raises(ValueError, match="at least 2 seeds"):
        seed_interval([0.1], S)


def test_seed_interval_is_floored_by_the_seeds_own_cis():
    """Three seeds with the same difference 0.1 (sd = 0): the t-interval alone has zero width. With
    each seed's CI 0.1 ± 0.196 (se = 0.1 at z = 1.959964), the floor is z · √(3 · 0.1²) / 3 =
    1.959964 · 0.057735 = 0.113159, so the claim "> 0" is not shown."""
    within = [Interval(0.1, 0.1 - 0.1959964, 0.1 + 0.1959964)] * 3
    bare = seed_interval([0.1] * 3, S)
    assert bare.high - bare.low < 1e-12  # zero width: what the floor guards against
    got = seed_interval([0.1] * 3, S, within)
    assert (got.low, got.high) == pytest.approx((0.1 - 0.113159, 0.1 + 0.113159), abs=1e-6)
    assert verdict(got, "greater", S) == NOT_SHOWN
    wide = seed_interval([0.1, 0.2, 0.3], S, [Interval(0.2, 0.19, 0.21)] * 3)  # spread dominates
    assert wide == seed_interval([0.1, 0.2, 0.3], S)
    with pytest.raises(ValueError, match="one each"):
        seed_interval([0.1, 0.2], S, within)


@pytest.mark.parametrize(
    "interval, claim, expected",
    [
        ((0.10, 0.02, 0.20), "greater", CONFIRMED),
        ((0.10, -0.01, 0.20), "greater", NOT_SHOWN),
        ((-0.10, -0.20, 0.01), "greater", NOT_SHOWN),
        ((-0.10, -0.20, -0.02), "greater", CONTRADICTED),
        ((0.00, -0.02, 0.02), "close", CONFIRMED),  # inside ±0.03
        ((0.01, -0.02, 0.04), "close", NOT_SHOWN),
        ((0.05, 0.03, 0.07), "close", CONTRADICTED),  # entirely at or beyond +0.03
        ((-0.05, -0.07, -0.04), "close", CONTRADICTED),
    ],
)
def test_verdict_rule(interval, claim, expected):
    assert verdict(Interval(*interval), claim, S) == expected


def test_all_dimensions_verdict():
    assert all_dimensions_verdict([CONFIRMED, CONFIRMED]) == CONFIRMED
    assert all_dimensions_verdict([CONFIRMED, NOT_SHOWN]) == NOT_SHOWN
    assert all_dimensions_verdict([CONFIRMED, CONTRADICTED]) == CONTRADICTED


def test_pooled_hpa_keeps_each_seeds_prompts_apart():
    """Prompt "a" in seed 0 (two hits) and in seed 1 (two misses) are two clusters: resamples of two
    clusters give 0, 0.5 or 1, so the CI is [0, 1]. (One merged cluster would give [0.5, 0.5].)"""
    per_seed = [([2.0, 2.0], [1.0, 1.0], ["a", "a"]), ([1.0, 1.0], [2.0, 2.0], ["a", "a"])]
    assert pooled_hpa_interval(per_seed, S) == (0.5, 0.0, 1.0)


def test_simulated_half_width_matches_the_binomial_and_grows_with_correlation():
    """icc 0, 400 clusters of one pair at accuracy 0.65: the binomial half-width
    1.96 · √(0.65 · 0.35 / 400) = 0.0467. A within-prompt correlation widens it; more prompts narrow it."""
    s = StudySettings(bootstrap_resamples=500)
    binomial = simulated_half_width(400, 1, 0.65, 0.0, s, repeats=5)
    assert binomial == pytest.approx(1.96 * (0.65 * 0.35 / 400) ** 0.5, rel=0.08)
    narrow = simulated_half_width(20, 20, 0.65, 0.0, s, repeats=5)
    wide = simulated_half_width(20, 20, 0.65, 0.1, s, repeats=5)
    more = simulated_half_width(60, 20, 0.65, 0.1, s, repeats=5)
    assert narrow < wide and more < wide


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"level": 95}, "study.level"),
        ({"bootstrap_resamples": 10}, "study.bootstrap_resamples"),
        ({"close_margin": 0.0}, "study.close_margin"),
        ({"target_half_width": 0.0}, "study.target_half_width"),
        ({"min_clusters": 1}, "study.min_clusters"),
    ],
)
def test_settings_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        StudySettings(**kwargs)


# --------------------------------------------------------------------------------------------------
# the reward section of the study report, on hand-made predictions

# two prompts, one pair each: a0 (ŝ 3) beats a1 (ŝ 1), b0 (ŝ 4) beats b1 (ŝ 2)
RECORDS = {"a0": ("a", 3.0), "a1": ("a", 1.0), "b0": ("b", 4.0), "b1": ("b", 2.0)}
RIGHT, WRONG, TIE = (2.0, 1.0), (1.0, 2.0), (1.5, 1.5)  # (μ_winner, μ_loser)
LABELS = {
    "gdso": "GDSO",
    "grpo": "GRPO",
    "teacher_sft": "Teacher SFT",
    "rewarddance": "RewardDance",
    "student_sft": "Student SFT",
    "opd": "OPD",
    "risd": "RISD",
}


def _write_seed(folder, outcomes):
    """outcomes: run -> (pair a outcome, pair b outcome) as (μ_w, μ_l)."""
    for run, (on_a, on_b) in outcomes.items():
        mu = {"a0": on_a[0], "a1": on_a[1], "b0": on_b[0], "b1": on_b[1]}
        rows = [
            {"id": i, "prompt": p, "dimension": "alignment", "score": s, "mu": mu[i]}
            for i, (p, s) in RECORDS.items()
        ]
        path = folder / "reward" / run / "eval" / "predictions.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _seed(folder, opd):
    return _write_seed(
        folder,
        {
            "gdso": (RIGHT, WRONG),  # HPA 0.5
            "grpo": (TIE, WRONG),  # HPA 0, tie rate 0.5, ties as half 0.25
            "teacher_sft": (RIGHT, WRONG),
            "rewarddance": (RIGHT, RIGHT),
            "student_sft": (WRONG, WRONG),
            "opd": opd,
            "risd": (RIGHT, WRONG),
        },
    )


def _verdicts(md):
    return {
        row.split(" | ")[1]: row.split(" | ")[-1].rstrip(" |")
        for row in md.splitlines()
        if row.startswith("| teacher |") or row.startswith("| student |")
    }


def test_reward_study_rows_cis_and_verdicts(tmp_path):
    dirs = {0: _seed(tmp_path / "s0", (WRONG, WRONG)), 1: _seed(tmp_path / "s1", (RIGHT, RIGHT))}
    md = reward_study_markdown(dirs, LABELS, S)
    assert "| 0 | GRPO | 0.000 [0.000, 0.000] | 0.500 | 0.250 | 2 |" in md
    assert "| 1 | GDSO | 0.500 [0.000, 1.000] | 0.000 | 0.500 | 2 |" in md
    assert "| OPD | 0.500 [" in md  # per-seed HPA 0 and 1: mean 0.5, t CI over 2 seeds
    assert _verdicts(md) == {
        "GDSO > GRPO": CONFIRMED,  # d = 0.5 in both seeds
        "GDSO > SFT": NOT_SHOWN,  # d = 0
        "GDSO > RewardDance": CONTRADICTED,  # d = −0.5 in both seeds
        "RISD > OPD": NOT_SHOWN,  # d = 0.5, then −0.5: t CI over 2 seeds includes 0
        "RISD > student SFT": CONFIRMED,
        "RISD close to its GDSO teacher": CONFIRMED,  # d = 0 on every resample
    }
    # per seed, the paired difference GDSO − GRPO: pairs (1, 0) -> 0.5 [0, 1]; across the two seeds
    # sd = 0, so the floor sets the CI: se = 1 / 2z per seed, half = z · √2 · se / 2 = 0.353553
    gdso_grpo = next(r for r in md.splitlines() if "GDSO > GRPO" in r)
    assert gdso_grpo.count("0.500 [0.000, 1.000]") == 2 and "0.500 [0.146, 0.854]" in gdso_grpo
    # pooled over both seeds: 4 prompt clusters (seed/prompt) of one pair each. RewardDance is right
    # on all 4: [1, 1]; GDSO hits (1, 0, 1, 0): a resample of 4 clusters is all-miss with p = 1/16 >
    # 2.5%, all-hit likewise, so the CI is [0, 1], half-width 0.5 > 0.03
    assert "| RewardDance | 1.000 [1.000, 1.000] | 0.000 | yes |" in md
    assert "| GDSO | 0.500 [0.000, 1.000] | 0.500 | **no** |" in md
    assert "seed 0 has 2 test prompt clusters, seed 1 has 2 test prompt clusters (fewer than 20)" in md


def test_reward_study_one_seed_uses_the_bootstrap_ci(tmp_path):
    md = reward_study_markdown({3: _seed(tmp_path / "s3", (WRONG, WRONG))}, LABELS, S)
    assert "(one seed)" in md and "mean HPA over" not in md
    assert _verdicts(md)["GDSO > GRPO"] == NOT_SHOWN  # per-seed CI [0, 1] includes 0


def test_reward_study_rejects_predictions_without_prompts(tmp_path):
    folder = _seed(tmp_path / "s0", (WRONG, WRONG))
    path = folder / "reward" / "gdso" / "eval" / "predictions.jsonl"
    path.write_text(json.dumps({"id": "a0", "dimension": "alignment", "score": 3.0, "mu": 1.0}) + "\n")
    with pytest.raises(ValueError, match=r"predictions.jsonl:1: missing \['prompt'\]"):
        reward_study_markdown({0: folder}, LABELS, S)


def _write_generator(folder, verdicts, diffs):
    """verdicts: one G/S/B per item (prompts a, b); diffs: dimension -> Z-Reward − SFT per item."""
    gsb = folder / "generator" / "gsb"
    gsb.mkdir(parents=True)
    items = [{"prompt": p, "seed": 0, "verdict": v} for p, v in zip("ab", verdicts)]
    (gsb / "verdicts_zreward_vs_sft.json").write_text(json.dumps(items))
    sft = [{d: 3.0 for d in diffs} for _ in verdicts]
    zr = [{d: 3.0 + diffs[d][i] for d in diffs} for i in range(len(verdicts))]
    (gsb / "oracle_scores.json").write_text(json.dumps({"base": sft, "sft": sft, "zreward": zr}))
    return folder


def test_generator_study_gsb_and_oracle_dimension_verdicts(tmp_path):
    diffs = {"alignment": [0.5, 0.5], "realism": [-1.0, -1.0], "aesthetics": [0.0, 0.0]}
    dirs = {
        0: _write_generator(tmp_path / "s0", ["G", "G"], diffs),  # GSB 1 on both prompts
        1: _write_generator(tmp_path / "s1", ["G", "B"], diffs),  # GSB 0: items +1, −1
    }
    md = generator_study_markdown(dirs, S)
    rows = {
        r.split(" | ")[0].lstrip("| "): r for r in md.splitlines() if r.startswith("| ") and "claim" not in r
    }
    # GSB: seed 0 1.0 [1, 1]; seed 1 0.0 [−1, 1]; across seeds (1, 0): mean 0.5, t CI ±12.706·0.7071/√2
    assert (
        "| 1.000 [1.000, 1.000] | 0.000 [-1.000, 1.000] | 0.500 [-5.853, 6.853] | Not shown |"
        in rows["GSB Z-Reward vs SFT > 0"]
    )
    assert rows["oracle alignment: Z-Reward > SFT"].endswith(f"| {CONFIRMED} |")
    assert rows["oracle realism: Z-Reward > SFT"].endswith(f"| {CONTRADICTED} |")
    assert rows["oracle aesthetics: Z-Reward > SFT"].endswith(f"| {NOT_SHOWN} |")
    assert rows["no oracle dimension of Z-Reward below SFT"].endswith(f"| {CONTRADICTED} |")
