"""Matched compute budgets of the demo's reward models (issue 12 §2): measured, never enforced.

Every trained reward model has one CPU-seconds budget (``reward.budget_cpu_seconds``); each method's
step count is set in the demo config so that its expected CPU time is about that budget. Stopping
never depends on measured time (the same seed on the same machine gives the same numbers); instead
the report compares each run's measured training CPU seconds (:mod:`zr_diffusion.reward.clock`,
evaluations excluded) with the budget, flags the methods outside ±:data:`TOLERANCE`, and gives the
step count that would meet the budget at the measured rate. The validation curves (val HPA against
CPU seconds) show what each method bought with its time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context

TOLERANCE = 0.25  # a method whose CPU seconds differ from the budget by more than this share is flagged


class BudgetRow(NamedTuple):
    name: str  # the run's folder name
    label: str  # the report's name
    steps: int
    cpu_seconds: float | None  # training CPU seconds (None: a run logged before the clock existed)
    eval_cpu_seconds: float | None  # its in-loop validation evaluations
    budget: float

    @property
    def cpu_per_step(self) -> float | None:
        return None if self.cpu_seconds is None or self.steps < 1 else self.cpu_seconds / self.steps

    @property
    def share(self) -> float | None:
        """Measured CPU seconds / budget (1.0 = on budget)."""
        return None if self.cpu_seconds is None else self.cpu_seconds / self.budget

    @property
    def within(self) -> bool | None:
        return None if self.share is None else abs(self.share - 1.0) <= TOLERANCE

    @property
    def steps_for_budget(self) -> int | None:
        """The step count that meets the budget at this run's measured CPU seconds per step."""
        rate = self.cpu_per_step
        return None if not rate else steps_for_budget(self.budget, rate)


def steps_for_budget(budget: float, cpu_per_step: float) -> int:
    """``round(budget / cpu_per_step)``, at least 1: the steps a method gets for a CPU budget."""
    if not (budget > 0 and cpu_per_step > 0):
        raise ValueError(f"steps_for_budget: budget {budget} and cpu_per_step {cpu_per_step} must be > 0")
    return max(1, round(budget / cpu_per_step))


def eval_every(max_steps: int, points: int) -> int:
    """``run.eval_every`` that gives ``points`` validation evaluations (the last one at the end):
    every ``max_steps // points`` steps, at least 1."""
    if max_steps < 1 or points < 1:
        raise ValueError(f"eval_every: max_steps {max_steps} and points {points} must be >= 1")
    return max(1, max_steps // points)


def _train_metrics(run: dict) -> dict:
    path = Path(run["train_metrics"])
    return json.loads(path.read_text()) if path.is_file() else {}


def budget_rows(runs: dict[str, dict], order: list[str], budget: float) -> list[BudgetRow]:
    """One row per trained run (``runs``: the reward stage's summaries, with ``train_metrics``)."""
    rows = []
    for name in order:
        run = runs[name]
        if "train_metrics" not in run:
            continue
        clock = _train_metrics(run).get("clock") or {}
        rows.append(
            BudgetRow(
                name,
                run["label"],
                int(run.get("steps", 0)),
                clock.get("cpu_seconds"),
                clock.get("eval_cpu_seconds"),
                budget,
            )
        )
    return rows


def val_curve(run: dict, key: str = "hpa") -> tuple[list[float], list[float]]:
    """(training CPU seconds, val ``key``) at each of the run's validation evaluations."""
    rows = [r for r in _train_metrics(run).get("eval", []) if "cpu_seconds" in r and r.get(key) is not None]
    return [float(r["cpu_seconds"]) for r in rows], [float(r[key]) for r in rows]


def figure_val_hpa_cpu(runs: dict[str, dict], order: list[str], budget: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name in order:
        if "train_metrics" not in runs[name]:
            continue
        x, y = val_curve(runs[name])
        if x:
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=runs[name]["label"])
    ax.axvline(budget, color="grey", ls="--", lw=0.8, label="budget")
    ax.axhline(0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("training CPU seconds (evaluations excluded)")
    ax.set_ylabel("val HPA (Eq. 17)")
    ax.set_title("Validation HPA against CPU time", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def budget_markdown(rows: list[BudgetRow], budget: float) -> list[str]:
    lines = [
        "| model | steps | CPU s | CPU s/step | share of budget | within ±"
        f"{TOLERANCE:.0%} | steps for the budget | val eval CPU s |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        within = "n/a" if r.within is None else ("yes" if r.within else "**no**")
        lines.append(
            f"| {r.label} | {r.steps} | {_cell(r.cpu_seconds, '.0f')} | {_cell(r.cpu_per_step, '.3f')} | "
            f"{_cell(r.share, '.2f')} | {within} | {_cell(r.steps_for_budget, 'd')} | "
            f"{_cell(r.eval_cpu_seconds, '.0f')} |"
        )
    outside = [r.label for r in rows if r.within is False]
    unknown = [r.label for r in rows if r.within is None]
    lines.append("")
    if outside:
        lines.append(f"**Outside the budget (±{TOLERANCE:.0%} of {budget:g} CPU s):** {', '.join(outside)}.")
    if unknown:
        lines.append(f"No CPU seconds logged (a run from before the clock; rerun it): {', '.join(unknown)}.")
    if not outside and not unknown:
        lines.append(f"Every method is within ±{TOLERANCE:.0%} of the {budget:g} CPU-second budget.")
    return lines


def budget_section(ctx: Context, figure: Path) -> list[str]:
    """The report's budget subsection: the table, the flag line, the figure."""
    reward = ctx.results["reward"]
    budget = ctx.cfg.reward.budget_cpu_seconds
    rows = budget_rows(reward["runs"], reward["order"], budget)
    return [
        "### Compute budget and validation curves",
        "",
        f"Every trained reward model has the same budget of {budget:g} training CPU seconds "
        "(`reward.budget_cpu_seconds`); each method's steps are set in the demo config so that its "
        "expected CPU time is about the budget. Training stops at those steps, never on measured time "
        "(the same seed on the same machine gives the same numbers), so the measured CPU seconds are "
        "reported against the budget here. CPU seconds are the training loop's process CPU time "
        "(`time.process_time`, all threads), the validation evaluations excluded (their own column); "
        "RISD's teacher targets, computed once before its loop, are not in its count. *Steps for the "
        "budget*: the step count that would meet the budget at the measured rate.",
        "",
        *budget_markdown(rows, budget),
        "",
        f"![val HPA against CPU seconds](report/{figure.name})",
        "",
    ]


def budget_metrics(ctx: Context) -> dict:
    reward = ctx.results["reward"]
    budget = ctx.cfg.reward.budget_cpu_seconds
    rows = budget_rows(reward["runs"], reward["order"], budget)
    return {
        "budget_cpu_seconds": budget,
        "tolerance": TOLERANCE,
        "runs": {
            r.name: {
                "steps": r.steps,
                "cpu_seconds": r.cpu_seconds,
                "cpu_seconds_per_step": r.cpu_per_step,
                "share_of_budget": r.share,
                "within_tolerance": r.within,
                "steps_for_budget": r.steps_for_budget,
                "eval_cpu_seconds": r.eval_cpu_seconds,
                "val_curve": dict(zip(("cpu_seconds", "hpa"), val_curve(reward["runs"][r.name]))),
            }
            for r in rows
        },
    }
