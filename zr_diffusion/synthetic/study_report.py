"""The multi-seed study's reward section (issue 12 §2): per-seed HPA rows, CIs and the verdicts.

Input: one demo output folder per seed; each reward run's ``reward/<run>/eval/predictions.jsonl``
(one μ per test record, with its prompt, dimension and annotated score ŝ); the HPA on the held-out
generator samples from ``reward/<run>/eval_generated/predictions.jsonl``. Pairs follow
``data.build_pairs``: same prompt, same dimension, ŝ different. The statistics are in
:mod:`zr_diffusion.synthetic.study`; the verdict rule is in its ``StudySettings``.

Dimension names: P pairs, K seeds.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from zr_diffusion.synthetic.report import failed_gates_banner, gate_result
from zr_diffusion.synthetic.study import (
    Interval,
    StudySettings,
    all_dimensions_verdict,
    cluster_bootstrap,
    hpa_difference_interval,
    hpa_interval,
    pair_outcomes,
    pooled_hpa_interval,
    seed_interval,
    verdict,
)

__all__ = [
    "REWARD_CLAIMS",
    "Claim",
    "GeneratorItems",
    "SeedPairs",
    "gates_study_markdown",
    "generated_hpa_markdown",
    "generator_study_markdown",
    "load_generator_items",
    "load_predictions",
    "reward_study_markdown",
    "seed_pairs",
]


class Claim(NamedTuple):
    group: str  # teacher | student
    text: str  # the paper's claim, as the verdict table names it
    a: str  # reward run (demo_reward.RUNS name) on the left of the difference A − B
    b: str
    kind: str  # "greater" | "close" (study.verdict)


REWARD_CLAIMS: tuple[Claim, ...] = (
    Claim("teacher", "GDSO > GRPO", "gdso", "grpo", "greater"),
    Claim("teacher", "GDSO > SFT", "gdso", "teacher_sft", "greater"),
    Claim("teacher", "GDSO > RewardDance", "gdso", "rewarddance", "greater"),
    Claim("student", "RISD > OPD", "risd", "opd", "greater"),
    Claim("student", "RISD > student SFT", "risd", "student_sft", "greater"),
    Claim("student", "RISD close to its GDSO teacher", "risd", "gdso", "close"),
)


class SeedPairs(NamedTuple):
    """The test pairs of one seed's world: ``[P]`` prompts and the winner / loser record ids."""

    prompts: list[str]
    winners: list[str]
    losers: list[str]


def load_predictions(path: Path) -> dict[str, dict]:
    """``predictions.jsonl`` as ``{record id: row}``; every row needs id, prompt, dimension, score, mu."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictions (run the demo's reward stage for this seed first)")
    rows = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        row = json.loads(line)
        missing = {"id", "prompt", "dimension", "score", "mu"} - set(row)
        if missing:
            raise ValueError(f"{path}:{n}: missing {sorted(missing)} (written by an older zr eval-reward?)")
        rows[row["id"]] = row
    return rows


def seed_pairs(predictions: Mapping[str, dict]) -> SeedPairs:
    """All same-prompt, same-dimension pairs with ŝ different, the higher-ŝ record as winner."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in predictions.values():
        groups.setdefault((row["prompt"], row["dimension"]), []).append(row)
    prompts, winners, losers = [], [], []
    for (prompt, _), rows in groups.items():
        for x, y in itertools.combinations(rows, 2):
            if x["score"] != y["score"]:
                w, lo = (x, y) if x["score"] > y["score"] else (y, x)
                prompts.append(prompt)
                winners.append(w["id"])
                losers.append(lo["id"])
    return SeedPairs(prompts, winners, losers)


def _mus(pairs: SeedPairs, predictions: Mapping[str, dict], where: str) -> tuple[np.ndarray, np.ndarray]:
    missing = sorted(set(pairs.winners + pairs.losers) - set(predictions))
    if missing:
        raise ValueError(
            f"{where}: no prediction for test record(s) {missing[:3]}; all runs must score one split"
        )
    mu_w = np.array([predictions[i]["mu"] for i in pairs.winners], dtype=np.float64)  # [P]
    mu_l = np.array([predictions[i]["mu"] for i in pairs.losers], dtype=np.float64)  # [P]
    return mu_w, mu_l


def _read_seed(
    folder: Path, runs: Sequence[str], sub: str = "eval"
) -> tuple[SeedPairs, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """The pairs and every run's ``(μ_w, μ_l)`` of one test set (``reward/<run>/<sub>/``)."""
    preds = {r: load_predictions(folder / "reward" / r / sub / "predictions.jsonl") for r in runs}
    pairs = seed_pairs(preds[runs[0]])
    return pairs, {r: _mus(pairs, preds[r], f"{folder}/reward/{r}") for r in runs}


def _hpa_cells(pairs: SeedPairs, mus, run: str, settings: StudySettings) -> tuple[Interval, str]:
    """One model's HPA [CI], tie rate, ties-as-half HPA and pair count, as table cells."""
    hits, ties = pair_outcomes(*mus[run])
    ci = hpa_interval(*mus[run], pairs.prompts, settings)
    half = float((hits + ties / 2).mean())
    return ci, f"{ci.cell()} | {ties.mean():.3f} | {half:.3f} | {len(hits)}"


def generated_hpa_markdown(
    seed_dirs: Mapping[int, Path], labels: Mapping[str, str], settings: StudySettings
) -> str:
    """Per seed, each model's HPA on the second test set, the base generator's annotated samples of
    the test prompts (``reward/<run>/eval_generated``). Shown, not used by any verdict."""
    runs = list(labels)
    pct = f"{settings.level:.0%}"
    lines = [
        f"## Reward models: HPA on held-out generator samples, {pct} CIs (no verdict)",
        "",
        "The base generator's samples of the test prompts, annotated by the world's annotators; CIs as above.",
        "",
        f"| seed | test set | model | HPA [{pct} CI] | tie rate | HPA, ties as half | pairs |",
        "|---:|---|---|---|---:|---:|---:|",
    ]
    for s in sorted(seed_dirs):
        pairs, mus = _read_seed(Path(seed_dirs[s]), runs, "eval_generated")
        for r in runs:
            cells = _hpa_cells(pairs, mus, r, settings)[1] if pairs.winners else "n/a | n/a | n/a | 0"
            lines.append(f"| {s} | generator samples | {labels[r]} | {cells} |")
    return "\n".join(lines) + "\n"


def _sizing_lines(
    seeds: list[int],
    data: Mapping[int, tuple[SeedPairs, dict[str, tuple[np.ndarray, np.ndarray]]]],
    runs: Sequence[str],
    labels: Mapping[str, str],
    settings: StudySettings,
) -> list[str]:
    """Is the test split big enough? Each model's HPA pooled over the seeds with a prompt-cluster
    bootstrap over all seeds' prompts together, its CI half-width against the target, and a warning
    for every seed with fewer prompt clusters than a percentile bootstrap needs."""
    pct, target = f"{settings.level:.0%}", settings.target_half_width
    lines = [
        "",
        f"Test split sizing: HPA pooled over the {len(seeds)} seed(s), {pct} CI from a prompt-cluster bootstrap "
        f"over all seeds' prompts together; target half-width ≤ {target:g}.",
        "",
        f"| model | pooled HPA [{pct} CI] | half-width | ≤ {target:g} |",
        "|---|---|---:|---|",
    ]
    for r in runs:
        ci = pooled_hpa_interval([(*data[s][1][r], data[s][0].prompts) for s in seeds], settings)
        half = (ci.high - ci.low) / 2
        lines.append(f"| {labels[r]} | {ci.cell()} | {half:.3f} | {'yes' if half <= target else '**no**'} |")
    few = {s: len(set(data[s][0].prompts)) for s in seeds}
    few = {s: c for s, c in few.items() if c < settings.min_clusters}
    if few:
        lines += [
            "",
            "**Warning:** "
            + ", ".join(f"seed {s} has {c} test prompt clusters" for s, c in few.items())
            + f" (fewer than {settings.min_clusters}): a percentile bootstrap over so few clusters gives "
            "intervals that are too narrow; use more test prompts (world.num_prompts, world.test_fraction).",
        ]
    return lines


def reward_study_markdown(
    seed_dirs: Mapping[int, Path], labels: Mapping[str, str], settings: StudySettings
) -> str:
    """The study's reward tables over ``{seed: demo output folder}``; ``labels``: run -> table name.

    Per seed, each model's Eq. 17 HPA with its prompt-cluster bootstrap CI, tie rate and ties-as-half
    HPA. Verdicts: per seed the paired bootstrap CI of HPA(A) − HPA(B); with ≥ 2 seeds the verdict
    comes from the Student-t CI over the per-seed differences, with 1 seed from that seed's CI.
    """
    runs = list(labels)
    seeds = sorted(seed_dirs)
    data = {s: _read_seed(Path(seed_dirs[s]), runs) for s in seeds}
    pct = f"{settings.level:.0%}"
    lines = [
        f"## Reward models: HPA (Eq. 17) on the test pairs, {pct} CIs",
        "",
        f"Within a seed: prompt-cluster percentile bootstrap ({settings.bootstrap_resamples} resamples, "
        f"seed {settings.bootstrap_seed}). Across seeds: Student-t interval over the per-seed values, never narrower than "
        "the seeds' own CIs imply. "
        "A model tie (μ_w = μ_l) counts as wrong; the last HPA column counts it as half.",
        "",
        f"| seed | model | HPA [{pct} CI] | tie rate | HPA, ties as half | pairs |",
        "|---:|---|---|---:|---:|---:|",
    ]
    per_seed_hpa: dict[str, list[Interval]] = {r: [] for r in runs}
    for s in seeds:
        for r in runs:
            ci, cells = _hpa_cells(*data[s], r, settings)
            per_seed_hpa[r].append(ci)
            lines.append(f"| {s} | {labels[r]} | {cells} |")
    if len(seeds) >= 2:
        lines += [
            "",
            f"| model | mean HPA over {len(seeds)} seeds [{pct} CI: t over seeds, floored by the seeds' own CIs] |",
            "|---|---|",
        ]
        lines += [
            f"| {labels[r]} | {seed_interval([c.estimate for c in per_seed_hpa[r]], settings, per_seed_hpa[r]).cell()} |"
            for r in runs
        ]
    lines += _sizing_lines(seeds, data, runs, labels, settings)
    lines += ["", "## Verdicts (the rule: the `study` section of the demo config)", ""]
    head = ["group", "claim", *(f"seed {s}: A − B [{pct} CI]" for s in seeds), "across seeds", "verdict"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for claim in REWARD_CLAIMS:
        if claim.a not in labels or claim.b not in labels:
            raise ValueError(f"claim {claim.text!r}: runs {claim.a!r}, {claim.b!r} must both be in {runs}")
        diffs = [
            hpa_difference_interval(*data[s][1][claim.a], *data[s][1][claim.b], data[s][0].prompts, settings)
            for s in seeds
        ]
        across: Interval = (
            seed_interval([d.estimate for d in diffs], settings, diffs) if len(seeds) >= 2 else diffs[0]
        )
        across_cell = across.cell() if len(seeds) >= 2 else "(one seed)"
        cells = [
            claim.group,
            claim.text,
            *(d.cell() for d in diffs),
            across_cell,
            verdict(across, claim.kind, settings),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"“Close” means |HPA(RISD) − HPA(GDSO)| < {settings.close_margin:g}.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# the generator claims: GSB Z-Reward vs SFT and the oracle dimensions, per held-out item

_VALUE = {"G": 1.0, "S": 0.0, "B": -1.0}  # GSB = (G − B) / N is the mean of these over the items


class GeneratorItems(NamedTuple):
    """One seed's held-out GSB items (prompt × sampling seed), in the generator stage's order."""

    prompts: list[str]  # [N]
    gsb: np.ndarray  # [N] +1 / 0 / −1: the raters' majority verdict, Z-Reward vs SFT
    oracle_diff: dict[str, np.ndarray]  # dimension -> [N] oracle score Z-Reward − SFT, same noise


def gates_study_markdown(seed_dirs: Mapping[int, Path]) -> str:
    """Every seed's precondition gates (issue 12 §1), from its ``metrics.json``: one row per gate, one
    column per seed; the gates that failed in any seed are stated first, above the table."""
    seeds = sorted(seed_dirs)
    rows: dict[int, dict[str, dict]] = {}
    for s in seeds:
        path = Path(seed_dirs[s]) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the demo's report stage for seed {s} first)")
        gates = json.loads(path.read_text()).get("gates")
        if not gates:
            raise ValueError(f"{path}: no 'gates' list (written by a demo older than the gates)")
        rows[s] = {g["gate"]: g for g in gates}
    names = list(dict.fromkeys(name for s in seeds for name in rows[s]))
    failing = {n: [s for s in seeds if not rows[s].get(n, {}).get("passed", False)] for n in names}
    lines = ["## Gates: preconditions on the shared base models, per seed", ""]
    lines += failed_gates_banner(
        [f"{n} (seed {', '.join(map(str, failing[n]))})" for n in names if failing[n]], total=len(names)
    )
    head = ["gate", "measured on", "threshold", *(f"seed {s}" for s in seeds)]
    lines += ["| " + " | ".join(head) + " |", "|---|---|---:|" + "---:|" * len(seeds)]
    for name in names:
        measured = [rows[s][name] for s in seeds if name in rows[s]]
        same_on = len({g["on"] for g in measured}) == 1  # else each cell says what it was measured on
        cells = [
            "(not measured)"
            if (g := rows[s].get(name)) is None
            else f"{g['value']} {gate_result(g['passed'])}" + ("" if same_on else f" ({g['on']})")
            for s in seeds
        ]
        on = measured[0]["on"] if same_on else "(per seed)"
        lines.append("| " + " | ".join([name, on, measured[0]["threshold"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def load_generator_items(folder: Path) -> GeneratorItems:
    """From ``generator/gsb/verdicts_zreward_vs_sft.json`` and ``oracle_scores.json``."""
    gsb_dir = folder / "generator" / "gsb"
    paths = gsb_dir / "verdicts_zreward_vs_sft.json", gsb_dir / "oracle_scores.json"
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (run the demo's generator stage for this seed first)")
    verdicts = json.loads(paths[0].read_text())
    oracle = json.loads(paths[1].read_text())
    z, sft = oracle["zreward"], oracle["sft"]
    if not len(verdicts) == len(z) == len(sft):
        raise ValueError(f"{gsb_dir}: {len(verdicts)} verdicts but {len(z)} / {len(sft)} oracle rows")
    dims = list(z[0])
    return GeneratorItems(
        prompts=[v["prompt"] for v in verdicts],
        gsb=np.array([_VALUE[v["verdict"]] for v in verdicts]),
        oracle_diff={d: np.array([a[d] - b[d] for a, b in zip(z, sft)]) for d in dims},
    )


def _claim_cells(per_seed: Sequence[Interval], settings: StudySettings) -> tuple[list[str], Interval]:
    across = (
        seed_interval([d.estimate for d in per_seed], settings, per_seed)
        if len(per_seed) >= 2
        else per_seed[0]
    )
    cells = [d.cell() for d in per_seed] + [across.cell() if len(per_seed) >= 2 else "(one seed)"]
    return cells, across


def generator_study_markdown(seed_dirs: Mapping[int, Path], settings: StudySettings) -> str:
    """The generator verdict rows: GSB Z-Reward vs SFT > 0, and each oracle dimension's Z-Reward − SFT
    mean (the claim "no dimension below SFT" from the dimensions' "> 0" verdicts, strictly:
    ``study.all_dimensions_verdict``). CIs as for the reward models, clustered by prompt."""
    seeds = sorted(seed_dirs)
    items = {s: load_generator_items(Path(seed_dirs[s])) for s in seeds}
    pct = f"{settings.level:.0%}"
    head = ["claim", *(f"seed {s}: Z-Reward − SFT [{pct} CI]" for s in seeds), "across seeds", "verdict"]
    lines = ["## Generator verdicts (oracle raters and oracle scores, held-out prompts)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    gsb_cis = [cluster_bootstrap(items[s].gsb, items[s].prompts, settings) for s in seeds]
    cells, across = _claim_cells(gsb_cis, settings)
    lines.append(
        "| " + " | ".join(["GSB Z-Reward vs SFT > 0", *cells, verdict(across, "greater", settings)]) + " |"
    )
    dim_verdicts = []
    for d in items[seeds[0]].oracle_diff:
        cis = [cluster_bootstrap(items[s].oracle_diff[d], items[s].prompts, settings) for s in seeds]
        cells, across = _claim_cells(cis, settings)
        dim_verdicts.append(verdict(across, "greater", settings))
        lines.append("| " + " | ".join([f"oracle {d}: Z-Reward > SFT", *cells, dim_verdicts[-1]]) + " |")
    blank = [""] * (len(seeds) + 1)
    claim = "no oracle dimension of Z-Reward below SFT"
    lines.append("| " + " | ".join([claim, *blank, all_dimensions_verdict(dim_verdicts)]) + " |")
    lines += [
        "",
        "GSB per item: +1 / 0 / −1 for the raters' majority G / S / B, so the mean is (G − B) / N. The last "
        "row is Confirmed only when every dimension is, Contradicted when any dimension is.",
    ]
    return "\n".join(lines) + "\n"
