"""synthetic/budget.py: matched CPU budgets of the demo's reward models, on hand-built run logs."""

from __future__ import annotations

import json

import pytest

from zr_diffusion.synthetic.budget import (
    budget_markdown,
    budget_rows,
    eval_every,
    steps_for_budget,
    val_curve,
)


def _run(tmp_path, name: str, steps: int, cpu: float | None, evals: list[tuple[int, float, float]]) -> dict:
    metrics = {"eval": [{"step": s, "hpa": h, "cpu_seconds": c} for s, c, h in evals]}
    if cpu is not None:
        metrics["clock"] = {"cpu_seconds": cpu, "eval_cpu_seconds": 7.0}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(metrics))
    return {"label": name.upper(), "steps": steps, "train_metrics": str(path)}


def test_budget_rows_share_flag_and_steps_for_the_budget(tmp_path):
    """Budget 100 CPU s. a: 400 steps in 120 s -> 0.3 s/step, share 1.2 (within ±25%), 333 steps
    meet the budget (100 / 0.3 = 333.3). b: 80 steps in 40 s -> share 0.4, flagged, 200 steps.
    c: 100 steps in 126 s -> share 1.26, just outside. zs does not train: no row."""
    runs = {
        "zs": {"label": "ZS"},
        "a": _run(tmp_path, "a", 400, 120.0, [(200, 60.0, 0.6), (400, 120.0, 0.7)]),
        "b": _run(tmp_path, "b", 80, 40.0, []),
        "c": _run(tmp_path, "c", 100, 126.0, []),
    }
    rows = budget_rows(runs, ["zs", "a", "b", "c"], 100.0)
    assert [r.name for r in rows] == ["a", "b", "c"]
    a, b, c = rows
    assert a.cpu_per_step == pytest.approx(0.3) and a.share == pytest.approx(1.2) and a.within
    assert a.steps_for_budget == 333 and a.eval_cpu_seconds == 7.0
    assert b.share == pytest.approx(0.4) and b.within is False and b.steps_for_budget == 200
    assert c.share == pytest.approx(1.26) and c.within is False
    md = "\n".join(budget_markdown(rows, 100.0))
    assert "| A | 400 | 120 | 0.300 | 1.20 | yes | 333 | 7 |" in md
    assert "**Outside the budget (±25% of 100 CPU s):** B, C." in md
    assert val_curve(runs["a"]) == ([60.0, 120.0], [0.6, 0.7])


def test_a_run_logged_before_the_clock_is_not_applicable_not_zero(tmp_path):
    runs = {"old": _run(tmp_path, "old", 10, None, [])}
    (row,) = budget_rows(runs, ["old"], 50.0)
    assert row.cpu_seconds is None and row.share is None and row.within is None
    md = "\n".join(budget_markdown([row], 50.0))
    assert "| OLD | 10 | n/a | n/a | n/a | n/a | n/a | n/a |" in md
    assert "No CPU seconds logged (a run from before the clock; rerun it): OLD." in md
    assert "Every method is within" not in md


def test_eval_every_and_steps_for_budget():
    """80 steps, 5 points: every 16 steps (16, 32, 48, 64 and the final 80); 2 steps, 5 points: 1."""
    assert eval_every(80, 5) == 16 and eval_every(400, 5) == 80 and eval_every(2, 5) == 1
    assert steps_for_budget(600.0, 7.5) == 80
    with pytest.raises(ValueError, match="must be >= 1"):
        eval_every(0, 5)
    with pytest.raises(ValueError, match="must be > 0"):
        steps_for_budget(600.0, 0.0)
