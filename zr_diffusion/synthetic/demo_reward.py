"""``zr demo`` stage 3: the reward models of METHOD.md §2–4, trained and evaluated as a user would.

Every run builds its :class:`TrainRewardConfig` from the demo config (``reward.common`` merged with the
run's own mapping, plus the model, data, teacher, seed and output folder the demo fills in), writes
it to ``<run>/config.yaml`` and calls :func:`reward.train.train_reward` with it. Training records: the
world's, followed by the annotated base-generator samples of the training prompts (stage ``indomain``).
Every model is scored by :func:`reward.evaluate.evaluate_reward` on two multi-annotator test sets: the
world's renders (``<run>/eval``) and the base generator's samples of the test prompts
(``<run>/eval_generated``).

The evaluation mode follows how each model scores: the score-first models (SFT, RewardDance-style,
RISD) in student mode (one output token); the models that reason before the score (zero-shot,
GRPO, GDSO, and the OPD student, which learns the teacher's reasoning) in teacher mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from zr_diffusion.synthetic.stages import deep_merge, write_run_config

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context


class Run(NamedTuple):
    name: str  # folder under reward/, and the key of its settings in RewardSettings
    label: str  # the name in the report's tables
    base: str  # "teacher" or "student": which pretrained base VLM it starts from
    eval_mode: str  # "student" | "teacher"
    trains: bool = True


RUNS: tuple[Run, ...] = (
    Run("zero_shot", "Teacher zero-shot", "teacher", "teacher", trains=False),
    Run("teacher_sft", "Teacher SFT", "teacher", "student"),
    Run("rewarddance", "Teacher RewardDance", "teacher", "student"),
    Run("grpo", "Teacher GRPO", "teacher", "teacher"),
    Run("gdso", "Teacher GDSO", "teacher", "teacher"),
    Run("student_sft", "Student SFT", "student", "student"),
    Run("opd", "Student OPD", "student", "teacher"),
    Run("risd", "Student RISD", "student", "student"),
)
DISTILLED = ("opd", "risd")  # distil from the GDSO teacher
# every model is evaluated on both test sets: {test set: folder under reward/<run>/ and summary key}
TEST_SETS = {"renders": "eval", "generated": "eval_generated"}


def records_of(ctx: Context, test: str) -> str:
    """The test records of ``test``: the world's renders or the annotated base-generator samples."""
    if test == "renders":
        return str(Path(ctx.results["world"]["data"]) / "test.jsonl")
    return ctx.results["indomain"]["samples"]["test"]


def train_config(ctx: Context, run: Run, folder: Path, teacher: str | None) -> dict[str, Any]:
    """The TrainRewardConfig mapping of one run; validation on the world's val split, ``reward.val_points``
    times (unless the run sets its own ``run.eval_every``)."""
    from zr_diffusion.synthetic.budget import eval_every

    cfg = ctx.cfg
    settings = deep_merge(cfg.reward.common, getattr(cfg.reward, run.name))
    steps = settings.get("run", {}).get("max_steps")
    if not isinstance(steps, int):
        raise ValueError(f"reward.{run.name}.run.max_steps = {steps!r}: every trained run states its steps")
    filled = {
        "model": ctx.results["vlm"][run.base]["model"],
        "data": {
            "train": ctx.results["indomain"]["samples"]["train_merged"],  # world + generator samples
            "eval": str(Path(ctx.results["world"]["data"]) / "val.jsonl"),
        },
        "run": {"output_dir": str(folder), "seed": cfg.seed},
    }
    if "eval_every" not in settings["run"]:
        filled["run"]["eval_every"] = eval_every(steps, cfg.reward.val_points)
    if run.name in DISTILLED:
        filled["distill"] = {"teacher": teacher, "cache_dir": str(folder / "teacher_cache")}
    return deep_merge(settings, filled)


def eval_config(ctx: Context, run: Run, model: str, folder: Path, test: str = "renders") -> dict[str, Any]:
    """The EvalRewardConfig mapping of one run on one test set (``TEST_SETS``)."""
    cfg = ctx.cfg
    base = {k: v for k, v in cfg.reward.common.items() if k in ("dtype", "grid", "rollout")}
    filled = {
        "model": model,
        "data": records_of(ctx, test),
        "mode": run.eval_mode,
        "output_dir": str(folder / TEST_SETS[test]),
        "seed": cfg.seed,
        "device": "cpu",
    }
    return deep_merge(deep_merge(base, cfg.reward.eval), filled)


def _final_loss(metrics: dict) -> float | None:
    train = metrics.get("train") or []
    return train[-1].get("loss") if train else None


def _run_one(ctx: Context, run: Run, folder: Path, teacher: str | None) -> dict:
    import json
    import time

    from zr_diffusion.reward.config import EvalRewardConfig, TrainRewardConfig
    from zr_diffusion.reward.evaluate import evaluate_reward
    from zr_diffusion.reward.train import train_reward

    summary: dict[str, Any] = {"label": run.label, "eval_mode": run.eval_mode, "base": run.base}
    model = ctx.results["vlm"][run.base]["model"]
    if run.trains:
        train_cfg = write_run_config(
            TrainRewardConfig, train_config(ctx, run, folder, teacher), folder / "config.yaml"
        )
        tic = time.perf_counter()
        result = train_reward(train_cfg)
        summary["train_seconds"] = time.perf_counter() - tic
        summary["steps"] = result.step
        summary["final_loss"] = _final_loss(result.metrics)
        summary["train_metrics"] = str(folder / "metrics.json")
        model = str(result.model_dir)
        del result
    for test, sub in TEST_SETS.items():
        eval_cfg = write_run_config(
            EvalRewardConfig, eval_config(ctx, run, model, folder, test), folder / f"{sub}_config.yaml"
        )
        tic = time.perf_counter()
        evaluate_reward(eval_cfg)
        summary[f"{sub}_seconds"] = time.perf_counter() - tic
        summary[sub] = json.loads((folder / sub / "metrics.json").read_text())
    summary["model"] = model
    return summary


def _reward_step(ctx: Context, folder: Path, name: str, teacher: str | None) -> dict:
    return _run_one(ctx, next(r for r in RUNS if r.name == name), folder, teacher)


def _run_key(ctx: Context, run: Run, gdso: dict | None) -> dict:
    cfg = ctx.cfg
    return {
        "run": run.name,
        "settings": deep_merge(cfg.reward.common, getattr(cfg.reward, run.name, {})) if run.trains else None,
        "eval": cfg.reward.eval,
        "val_points": cfg.reward.val_points if run.trains else None,
        "world": ctx.results["world"]["hash"],
        "indomain": ctx.results["indomain"]["samples"]["hash"],  # training records and 2nd test set
        "base": ctx.results["vlm"][run.base]["hash"],
        "teacher": gdso["hash"] if gdso is not None else None,
        "seed": cfg.seed,
    }


def run_reward(ctx: Context, folder: Path) -> dict:
    """Every run of :data:`RUNS`, ``threads`` of them at once (each in its own one-thread process) when
    the demo has more than one torch thread; the distilled students start once GDSO is done."""
    from zr_diffusion.synthetic.stages import Step, run_steps

    def build(run: Run):
        def make(done: dict[str, dict]):
            gdso = done.get("reward/gdso") if run.name in DISTILLED else None
            teacher = gdso["model"] if gdso is not None else None
            return _run_key(ctx, run, gdso), _reward_step, (run.name, teacher)

        return make

    def report(name: str, summary: dict) -> None:
        hpa = summary["eval"]["metrics"]["overall"]["hpa"]
        gen = summary["eval_generated"]["metrics"]["overall"]["hpa"]
        print(
            f"  {name}: test HPA {hpa if hpa is None else f'{hpa:.3f}'} (renders), "
            f"{gen if gen is None else f'{gen:.3f}'} (generator samples)"
        )

    # side by side: GDSO and the students distilled from it first (the longest chain), then the others
    first = ("gdso", *DISTILLED)
    order = sorted(RUNS, key=lambda r: r.name not in first) if ctx.cfg.threads > 1 else RUNS
    steps = [
        Step(f"reward/{r.name}", build(r), ("reward/gdso",) if r.name in DISTILLED else ()) for r in order
    ]
    done = run_steps(ctx, steps, ctx.cfg.threads, on_done=report)
    out = {r.name: done[f"reward/{r.name}"] for r in RUNS}
    hpas = ", ".join(
        f"{r.name} {h:.3f}"
        if (h := out[r.name]["eval"]["metrics"]["overall"]["hpa"]) is not None
        else f"{r.name} n/a"
        for r in RUNS
    )
    return {"line": f"test HPA: {hpas}", "runs": out, "order": [r.name for r in RUNS]}
