"""zr_diffusion.reward.evaluate: hand-computed metric values (METHOD.md §5, Eq. 17) and ``zr eval-reward``.

Every expected number is derived in the test's docstring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from zr_diffusion.data import ScoredRecord
from zr_diffusion.reward.evaluate import (
    MetricUndefined,
    compute_metrics,
    hpa,
    hpa_ties_half,
    margin_hpa,
    plcc,
    srcc,
    tie_rate,
)

# ---------------------------------------------------------------------------------------- Eq. 17


def test_hpa_tie_counts_wrong():
    """Pairs (μ_a, μ_b, ŝ_a, ŝ_b):
    (4, 2, 5, 3): (+2)(+2) > 0  right
    (1, 3, 2, 4): (−2)(−2) > 0  right
    (3, 3, 4, 2): (0)(+2) = 0   a model tie: wrong
    (5, 1, 3, 3): ŝ_a = ŝ_b     not a pair, dropped
    -> HPA = 2/3.
    """
    assert hpa([4, 1, 3, 5], [2, 3, 3, 1], [5, 2, 4, 3], [3, 4, 2, 3]) == pytest.approx(2 / 3)


def test_tie_rate_and_hpa_with_ties_as_half():
    """The pairs of test_hpa_tie_counts_wrong: 3 pairs with ŝ_a ≠ ŝ_b (the 4th is dropped), one of
    them a model tie -> tie rate 1/3; HPA 2/3, with the tie as half 2/3 + 1/6 = 5/6.
    A constant scorer ties every pair: tie rate 1, HPA 0, HPA with ties as half 0.5 (chance)."""
    args = ([4, 1, 3, 5], [2, 3, 3, 1], [5, 2, 4, 3], [3, 4, 2, 3])
    assert tie_rate(*args) == pytest.approx(1 / 3)
    assert hpa_ties_half(*args) == pytest.approx(5 / 6)
    const = ([2.0, 2.0], [2.0, 2.0], [5.0, 1.0], [3.0, 4.0])
    assert (tie_rate(*const), hpa(*const), hpa_ties_half(*const)) == (1.0, 0.0, 0.5)
    with pytest.raises(MetricUndefined, match="tie_rate: none of the 1 pairs"):
        tie_rate([1.0], [2.0], [3.0], [3.0])


def test_hpa_orientation_does_not_matter():
    """Swapping a and b flips both factors of (μ_a − μ_b)(ŝ_a − ŝ_b): same HPA, here 1/2."""
    args = ([4.0, 1.0], [2.0, 3.0], [5.0, 4.0], [3.0, 2.0])  # right, wrong
    assert hpa(*args) == pytest.approx(0.5)
    assert hpa(args[1], args[0], args[3], args[2]) == pytest.approx(0.5)


def test_margin_hpa_keeps_clear_pairs_only():
    """Gaps |ŝ_a − ŝ_b| = 0.5 (right), 1.0 (wrong), 2.0 (right).
    HPA over all three = 2/3; margin HPA over the gaps > 0.5, i.e. {1.0 wrong, 2.0 right} = 1/2.
    """
    mu_a, mu_b = [3.0, 2.0, 4.0], [2.0, 3.0, 1.0]
    s_a, s_b = [3.5, 4.0, 5.0], [3.0, 3.0, 3.0]
    assert hpa(mu_a, mu_b, s_a, s_b) == pytest.approx(2 / 3)
    assert margin_hpa(mu_a, mu_b, s_a, s_b) == pytest.approx(1 / 2)


def test_margin_hpa_boundary_is_exclusive_even_for_float_means():
    """ŝ = mean(3.1, 3.2) = 3.15 vs 2.65: the gap is 0.5 up to rounding (0.5000000000000004 in
    float64), so the pair is not a margin pair -> no pairs -> MetricUndefined("0 pairs")."""
    s_a = [(3.1 + 3.2) / 2]
    assert abs(s_a[0] - 2.65) > 0.5  # the float really is above 0.5
    with pytest.raises(MetricUndefined, match=r"\|ŝ_a − ŝ_b\| > 0.5") as e:
        margin_hpa([3.0], [2.0], s_a, [2.65])
    assert e.value.reason == "0 pairs"


def test_hpa_without_pairs_is_undefined():
    with pytest.raises(MetricUndefined) as e:
        hpa([1.0, 2.0], [2.0, 1.0], [3.0, 4.0], [3.0, 4.0])
    assert e.value.reason == "0 pairs"
    with pytest.raises(MetricUndefined):
        hpa([], [], [], [])


def test_hpa_input_errors_name_the_value():
    with pytest.raises(ValueError, match=r"lengths \{'mu_a': 2, 'mu_b': 1"):
        hpa([1.0, 2.0], [1.0], [1.0, 2.0], [2.0, 1.0])
    with pytest.raises(ValueError, match=r"mu_b\[1\] = nan is not finite"):
        hpa([1.0, 2.0], [1.0, math.nan], [1.0, 2.0], [2.0, 1.0])
    with pytest.raises(ValueError, match="must be 1-D"):
        hpa([[1.0]], [[1.0]], [[1.0]], [[2.0]])


# ----------------------------------------------------------------------------------- PLCC / SRCC


def test_plcc_hand_value():
    """μ = [1, 2, 3], ŝ = [1, 2, 4]: deviations [−1, 0, 1] and [−4/3, −1/3, 5/3];
    Σ products = 4/3 + 0 + 5/3 = 3; Σ dμ² = 2; Σ dŝ² = (16 + 1 + 25)/9 = 14/3;
    r = 3 / sqrt(2 · 14/3) = sqrt(27/28) ≈ 0.98198."""
    assert plcc([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(27 / 28), abs=1e-9)


def test_srcc_hand_values_with_ties():
    """μ = [1, 2, 3, 4] ranks [1, 2, 3, 4]; ŝ = [1, 2, 2, 3] ranks [1, 2.5, 2.5, 4] (tied mean rank).
    Rank deviations [−1.5, −.5, .5, 1.5] and [−1.5, 0, 0, 1.5]: Σ products 4.5, Σ squares 5 and 4.5,
    so ρ = 4.5 / sqrt(5 · 4.5) = sqrt(0.9) ≈ 0.94868. A monotone μ gives 1, a reversed one −1.
    (torchmetrics ranks in float32 and adds 1e-6 to the denominator: agreement to 1e-5.)"""
    assert srcc([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, 2.0, 3.0]) == pytest.approx(math.sqrt(0.9), abs=1e-5)
    assert srcc([1.0, 2.0, 3.0], [1.0, 2.0, 4.0]) == pytest.approx(1.0, abs=1e-5)
    assert srcc([3.0, 2.0, 1.0], [1.0, 2.0, 4.0]) == pytest.approx(-1.0, abs=1e-5)


def test_correlations_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    mu = [3.1, 2.2, 4.7, 1.0, 2.2, 3.9, 4.4]
    s = [3.0, 2.5, 4.5, 1.5, 2.0, 3.0, 5.0]
    assert plcc(mu, s) == pytest.approx(scipy_stats.pearsonr(mu, s)[0], abs=1e-9)
    assert srcc(mu, s) == pytest.approx(scipy_stats.spearmanr(mu, s)[0], abs=1e-5)


@pytest.mark.parametrize("fn", [plcc, srcc])
def test_correlations_undefined_cases(fn):
    with pytest.raises(MetricUndefined, match="at least 2 records") as e:
        fn([1.0], [2.0])
    assert e.value.reason == "1 record"
    with pytest.raises(MetricUndefined) as e:
        fn([2.0, 2.0, 2.0], [1.0, 2.0, 3.0])
    assert e.value.reason == "constant μ"
    with pytest.raises(MetricUndefined) as e:
        fn([1.0, 2.0, 3.0], [4.0, 4.0, 4.0])
    assert e.value.reason == "constant ŝ"
    with pytest.raises(ValueError, match="got 3 and 2"):
        fn([1.0, 2.0, 3.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------- metric table


def rec(id: str, prompt: str, dimension: str, *scores: float) -> ScoredRecord:
    return ScoredRecord(id=id, prompt=prompt, image=Path(f"{id}.png"), dimension=dimension, scores=scores)


def _table_records():
    return [
        rec("a", "p1", "alignment", 5.0),
        rec("b", "p1", "alignment", 3.0),
        rec("c", "p1", "alignment", 3.0),
        rec("f", "p2", "alignment", 2.0),
        rec("d", "p1", "realism", 4.0),
        rec("e", "p1", "realism", 3.5),
        rec("g", "p1", "realism", 1.0, 3.0, 3.5, 5.0),
    ]


def test_compute_metrics_per_dimension_and_pooled():
    """Pairs need the same prompt AND dimension; g's ŝ = mean(3.0, 3.5) = 3.25 (drop high and low).

    alignment (μ a=4, b=2, c=4, f=1): pairs a>b (gap 2, μ 4>2 right), a>c (gap 2, μ tie: wrong);
      f (prompt p2) pairs with nothing. HPA 1/2; both gaps > 0.5, margin HPA 1/2.
    realism (μ d=3, e=2, g=2.5): d>e (gap .5, right), d>g (gap .75, right), e>g (gap .25, μ 2<2.5
      wrong). HPA 2/3; margin pairs {d>g}: margin HPA 1.
    overall (pooled): 5 pairs, 3 right -> 3/5; 3 margin pairs, 2 right -> 2/3.
    aesthetics has no records: every metric n/a.
    """
    records = _table_records()
    mu = [4.0, 2.0, 4.0, 1.0, 3.0, 2.0, 2.5]
    m = compute_metrics(
        records,
        mu,
        tokens_per_call=1.0,
        images_per_second=2.5,
        dimensions=("alignment", "realism", "aesthetics"),
    )
    assert [r.name for r in m.rows] == ["alignment", "realism", "aesthetics", "overall"]
    al, re, ae, ov = m.rows
    assert (al.pairs, al.margin_pairs, al.hpa, al.margin_hpa) == (2, 2, 0.5, 0.5)
    assert (re.pairs, re.margin_pairs) == (3, 1)
    assert re.hpa == pytest.approx(2 / 3) and re.margin_hpa == 1.0
    assert (ov.records, ov.pairs, ov.margin_pairs) == (7, 5, 3)
    assert ov.hpa == pytest.approx(3 / 5) and ov.margin_hpa == pytest.approx(2 / 3)
    assert ov.plcc == pytest.approx(plcc(mu, [r.score for r in records]))
    assert re.srcc == pytest.approx(srcc([3.0, 2.0, 2.5], [4.0, 3.5, 3.25]))
    # ties: alignment's a>c only (1 of 2), none in realism, 1 of the 5 pooled pairs
    assert (al.tie_rate, re.tie_rate, ov.tie_rate) == (0.5, 0.0, pytest.approx(1 / 5))
    assert al.hpa_ties_half == 0.75 and ov.hpa_ties_half == pytest.approx(3 / 5 + 1 / 10)
    assert ae.records == 0 and all(getattr(ae, k) is None for k in ("plcc", "srcc", "hpa", "margin_hpa"))
    assert ae.undefined == {
        "plcc": "0 records",
        "srcc": "0 records",
        "hpa": "0 pairs",
        "margin_hpa": "0 pairs",
        "tie_rate": "0 pairs",
        "hpa_ties_half": "0 pairs",
    }


def test_report_shows_na_and_json_has_no_nan(tmp_path):
    """realism has one 0.5-gap pair only: HPA 1, margin HPA "n/a (0 pairs)"; μ is constant on
    alignment: PLCC/SRCC "n/a (constant μ)". JSON stores null, never NaN."""
    from zr_diffusion.reward.evaluate import write_report

    records = [
        rec("a", "p", "alignment", 5.0),
        rec("b", "p", "alignment", 2.0),
        rec("d", "p", "realism", 4.0),
        rec("e", "p", "realism", 3.5),
    ]
    m = compute_metrics(records, [3.0, 3.0, 3.0, 2.0], tokens_per_call=1, images_per_second=4.0)
    write_report(m, tmp_path / "out")
    md = (tmp_path / "out" / "metrics.md").read_text()
    table = {line.split("|")[1].strip(): line for line in md.splitlines() if line.startswith("| ")}
    assert "n/a (0 pairs)" in table["realism"] and "1.0000" in table["realism"]
    assert table["alignment"].count("n/a (constant μ)") == 2
    assert "tokens/call: 1.0" in md and "images/s: 4.00" in md
    data = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert data["metrics"]["realism"]["margin_hpa"] is None
    assert data["metrics"]["realism"]["undefined"] == {"margin_hpa": "0 pairs"}
    assert data["metrics"]["overall"]["pairs"] == 2 and data["tokens_per_call"] == 1.0
    # alignment: μ 3 = 3 on its one pair: a tie, so HPA 0 and 0.5 with the tie as half
    assert (data["metrics"]["alignment"]["tie_rate"], data["metrics"]["alignment"]["hpa_ties_half"]) == (
        1.0,
        0.5,
    )
    assert md.startswith("| dimension | PLCC | SRCC | HPA | margin HPA | #pairs | #margin pairs | tie rate |")
    assert "NaN" not in (tmp_path / "out" / "metrics.json").read_text()


def test_compute_metrics_errors():
    records = _table_records()[:2]
    with pytest.raises(ValueError, match="got 1 μ values for 2 records"):
        compute_metrics(records, [1.0], tokens_per_call=1, images_per_second=1)
    with pytest.raises(ValueError, match="μ of record 'b' is nan"):
        compute_metrics(records, [1.0, math.nan], tokens_per_call=1, images_per_second=1)
    with pytest.raises(ValueError, match="id 'a' appears twice"):
        compute_metrics([records[0], records[0]], [1.0, 2.0], tokens_per_call=1, images_per_second=1)
    with pytest.raises(ValueError, match=r"dimension\(s\) \['alignment'\] not in \['realism'\]"):
        compute_metrics(records, [1.0, 2.0], tokens_per_call=1, images_per_second=1, dimensions=["realism"])


# ------------------------------------------------------------------------- zr eval-reward, tiny VLM

SCORES = {  # image k: (prompt, (H, W), alignment ŝ, realism ŝ)
    0: ("a red circle", (56, 56), 5.0, 4.0),
    1: ("a red circle", (56, 56), 3.0, 4.0),
    2: ("a blue square", (56, 84), 1.0, 2.0),
    3: ("a blue square", (56, 84), 4.0, 1.5),
    4: ("a blue square", (56, 56), 2.0, 3.0),
}


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """A tiny Qwen2-VL (random weights) and 10 records: 5 PNGs of two sizes x 2 dimensions, each with
    three annotators (ŝ = the middle one)."""
    import torch

    from zr_diffusion.data import save_image
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    root = tmp_path_factory.mktemp("eval")
    model = make_tiny_vlm(root / "model", family="qwen2_vl", seed=0)
    g = torch.Generator().manual_seed(0)
    rows = []
    for k, (prompt, size, s_align, s_real) in SCORES.items():
        save_image(torch.rand(3, *size, generator=g), root / f"img{k}.png")
        for dim, s in (("alignment", s_align), ("realism", s_real)):
            scores = [s, max(1.0, s - 0.5), min(5.0, s + 0.5)] if 1.0 < s < 5.0 else [s, s, s]
            rows.append(
                {
                    "id": f"{k}-{dim}",
                    "prompt": prompt,
                    "image": f"img{k}.png",
                    "dimension": dim,
                    "scores": scores,
                }
            )
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root, model


def _run_cli(*argv: str) -> int:
    from zr_diffusion.cli import main

    return main(["eval-reward", *argv])


def test_image_batches_share_images_and_sizes(tiny_eval):
    """Records of one (image, prompt) form one group (both dimensions); groups of one size are batched
    (batch_size 2): 56x56 holds images 0, 1, 4 -> batches [0, 1], [4]; 56x84 holds 2, 3 -> [2, 3]."""
    from zr_diffusion.data import load_records
    from zr_diffusion.reward.evaluate import image_batches

    root, _ = tiny_eval
    records = load_records(root / "test.jsonl", dimensions=("alignment", "realism"))
    batches = image_batches(records, batch_size=2)
    names = sorted([g.image.name for g in b] for b in batches)
    assert names == [["img0.png", "img1.png"], ["img2.png", "img3.png"], ["img4.png"]]
    for batch in batches:
        for g in batch:
            assert sorted(records[i].dimension for i in g.records) == ["alignment", "realism"]


def test_eval_reward_student_cli(tiny_eval, tmp_path, capsys):
    """Student mode: one token per call, μ of every record equals a direct one-image ZRewardModel
    call (batching by size and by dimension does not change the numbers); metrics.md lists every
    dimension, with aesthetics (no records) shown as n/a."""
    import torch

    from zr_diffusion.data import load_image
    from zr_diffusion.reward.model import ZRewardModel

    root, model = tiny_eval
    out = tmp_path / "student"
    rc = _run_cli(
        f"model={model}",
        f"data={root / 'test.jsonl'}",
        f"output_dir={out}",
        "dimensions=[alignment,realism,aesthetics]",
        "batch_size=2",
    )
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    md = (out / "metrics.md").read_text()
    assert data["tokens_per_call"] == 1.0 and data["images"] == 5 and data["scoring_calls"] == 10
    assert data["images_per_second"] > 0
    assert data["metrics"]["overall"]["pairs"] == 7  # alignment: 1 + 3, realism: 0 + 3
    assert data["metrics"]["aesthetics"]["undefined"]["hpa"] == "0 pairs"
    assert "n/a (0 records)" in md and "tokens/call: 1.0" in md
    assert "| overall |" in capsys.readouterr().out

    reward = ZRewardModel.from_pretrained(model, dimensions=("alignment", "realism", "aesthetics"))
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    for p in preds:
        k, dim = p["id"].split("-")
        assert p["prompt"] == SCORES[int(k)][0]
        with torch.no_grad():
            mu = reward(load_image(root / f"img{k}.png")[None], [SCORES[int(k)][0]]).mu
        assert p["mu"] == pytest.approx(float(mu[0, reward.dimensions.index(dim)]), abs=1e-5)


def test_eval_reward_teacher_cli(tiny_eval, tmp_path):
    """Teacher mode, 2 reasoning samples per record: 6 records -> 12 calls. A call counts the tokens
    the model generated (at most max_new_tokens = 6) and the score token, not a marker appended for
    the readout, so 1 < tokens/call <= 6 + 1 (the random tiny model rarely writes the marker itself);
    every μ (mean over the samples) lies on the score range [1, 5]."""
    root, model = tiny_eval
    out = tmp_path / "teacher"
    rc = _run_cli(
        f"model={model}",
        f"data={root / 'test.jsonl'}",
        f"output_dir={out}",
        "dimensions=[alignment,realism]",
        "mode=teacher",
        "rollout.max_new_tokens=6",
        "max_records=6",
        "teacher_samples=2",
    )
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["mode"] == "teacher" and data["scoring_calls"] == 12
    assert 1 < data["tokens_per_call"] <= 6 + 1
    assert data["metrics"]["overall"]["records"] == 6
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert all(1.0 <= p["mu"] <= 5.0 and "reasoning" in p for p in preds)
    assert (out / "metrics.md").read_text().startswith("| dimension | PLCC | SRCC | HPA | margin HPA |")


def test_eval_reward_cli_config_errors(tmp_path, capsys):
    assert _run_cli(f"data={tmp_path / 'x.jsonl'}") == 2
    assert "model: give the reward model folder" in capsys.readouterr().err
    assert _run_cli("model=m", "data=d.jsonl", "teacher_samples=0") == 2
    assert "teacher_samples must be >= 1, got 0" in capsys.readouterr().err
