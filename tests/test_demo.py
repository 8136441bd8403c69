"""``zr demo``: presets, the stage cache, and the smoke preset end to end.

The smoke run checks that every stage, every table row and every figure is produced (not the
values: a few optimizer steps each), that a rerun skips every cached stage and says so, and that a
changed setting rebuilds only what depends on it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from zr_diffusion.config import ConfigError, to_dict
from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.synthetic.demo import STAGES, DemoConfig, demo, load_demo_config, parse_seeds, study
from zr_diffusion.synthetic.demo_reward import RUNS
from zr_diffusion.synthetic.report import VARIANT_LABELS
from zr_diffusion.synthetic.stages import Cache

# ------------------------------------------------------------------------------------------ config


def test_default_preset_file_equals_the_dataclass_defaults():
    assert to_dict(load_demo_config("default")) == to_dict(DemoConfig())


def test_smoke_preset_loads_and_is_small():
    cfg = load_demo_config("smoke")
    assert cfg.preset == "smoke"
    assert cfg.world.num_prompts < DemoConfig().world.num_prompts
    assert cfg.vlm.teacher_pretrain.steps < 10


def test_seed_override_gives_another_world_and_world_seed_is_refused():
    cfg = load_demo_config("smoke", overrides=["seed=3", "output_dir=/tmp/x"])
    assert cfg.seed == 3 and cfg.world_config().seed == 3 and cfg.output_dir == "/tmp/x"
    with pytest.raises(ConfigError, match="top-level seed"):
        load_demo_config("smoke", overrides=["world.seed=3"])


def test_unknown_preset_and_unknown_key_are_errors():
    with pytest.raises(ValueError, match="valid presets"):
        load_demo_config("huge")
    with pytest.raises(ConfigError, match="unknown key"):
        load_demo_config("smoke", overrides=["vlm.nonsense=1"])


def test_cli_parses_the_demo_command():
    from zr_diffusion.cli import build_parser

    args = build_parser().parse_args(["demo", "--preset", "smoke", "--fresh", "seed=1"])
    assert args.preset == "smoke" and args.fresh and args.overrides == ["seed=1"]


def test_cli_parses_study_seeds_and_rejects_bad_ones():
    from zr_diffusion.cli import build_parser, main

    args = build_parser().parse_args(["demo", "--preset", "smoke", "--seeds", "0,1,2"])
    assert parse_seeds(args.seeds) == (0, 1, 2)
    for bad, why in (("0,x", "comma-separated integers"), ("1,1", "each seed once")):
        with pytest.raises(ValueError, match=why):
            parse_seeds(bad)
    assert main(["demo", "--preset", "smoke", "--seeds", "0,0"]) != 0  # a clear error, no run
    assert main(["demo", "--preset", "smoke", "--jobs", "2"]) != 0  # --jobs needs --seeds
    assert main(["demo", "--preset", "smoke", "--seeds", "0,1", "--jobs", "0"]) != 0


# ------------------------------------------------------------------------------------------- cache


def test_cache_reuses_a_finished_step_and_rebuilds_on_a_changed_key(tmp_path):
    calls, said = [], []
    cache = Cache(tmp_path, log=said.append)

    def step(folder: Path) -> dict:
        calls.append(folder)
        (folder / "out.txt").write_text("x")
        return {"line": "ok"}

    first = cache.run("a/b", {"k": 1}, step)
    again = cache.run("a/b", {"k": 1}, step)
    assert len(calls) == 1 and not first["cached"] and again["cached"]
    assert any("a/b: cached" in s for s in said)
    changed = cache.run("a/b", {"k": 2}, step)
    assert len(calls) == 2 and not changed["cached"]
    assert json.loads((tmp_path / "a/b/done.json").read_text())["hash"] == changed["hash"]


def test_a_zreward_judge_without_a_path_must_name_a_reward_run(tmp_path):
    from zr_diffusion.synthetic.demo_t2i import zreward_config
    from zr_diffusion.synthetic.stages import Context

    results = {"world": {"data": str(tmp_path / "data")}, "reward": {"runs": {"risd": {}, "teacher_sft": {}}}}
    ctx = Context(DemoConfig(), Cache(tmp_path), tmp_path, results)
    settings = {"validation": {"judges": {"clip": {"kind": "clipscore"}}}}
    with pytest.raises(
        ValueError, match=r"judges.clip: give a path, or name a reward run .*\['risd', 'teacher_sft'\]"
    ):
        zreward_config(ctx, tmp_path, "pipeline", "model", settings)


def test_cache_does_not_mark_a_failed_step_done(tmp_path):
    cache = Cache(tmp_path, log=lambda s: None)

    def boom(folder: Path) -> dict:
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        cache.run("s", {"k": 1}, boom)
    assert not (tmp_path / "s" / "done.json").exists()


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "seed-0"  # also seed 0 of a study in its parent folder
    cfg = load_demo_config("smoke", overrides=[f"output_dir={out}"])
    results = demo(cfg)
    return cfg, out, results


def test_smoke_writes_every_stage_table_row_and_figure(smoke_run):
    cfg, out, results = smoke_run
    assert set(results) == set(STAGES)
    for stage in STAGES:
        assert (out / stage / "done.json").is_file(), stage
    report = (out / "report.md").read_text()
    for run in RUNS:  # a row per reward model, in the metric table and the per-dimension table
        assert report.count(f"| {run.label} |") == (3 if run.trains else 2), run.label  # + budget table
    for ref in ("reference: latent true score", "reference: pixel oracle"):
        assert ref in report
    for row in (
        "| Z-Reward vs SFT |",
        "| SFT vs base (from scratch) |",
        "| Z-Reward vs base (from scratch) |",
    ):
        assert row in report
    for label in VARIANT_LABELS.values():
        assert f"| {label} | oracle |" in report and f"| {label} | RISD student |" in report
    for role in ("teacher", "student"):
        assert f"| {role} (" in report
    assert "+41.3%" in report and "Different world and scale" in report
    for name in ("accuracy", "curves", "samples", "val_hpa_cpu"):
        png = out / "report" / f"{name}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"report/{name}.png" in report
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["seed"] == 0 and set(metrics["stages"]) == set(STAGES) - {"report"}
    assert set(metrics["stages"]["reward"]["runs"]) == {r.name for r in RUNS}
    for run in RUNS:
        assert (out / "reward" / run.name / "eval" / "metrics.json").is_file()
    assert (out / "reward" / "gdso" / "config.yaml").is_file()  # the recipe config a user can rerun
    assert "versions" in metrics and metrics["versions"]["torch"]


def test_smoke_reports_cpu_budgets_val_curves_and_ties(smoke_run):
    """Every trained run validates on the val split val_points times, logs CPU seconds in every row,
    and has a row in the budget table; the reward table has the tie columns for models and references."""
    cfg, out, results = smoke_run
    report = (out / "report.md").read_text()
    assert "### Compute budget and validation curves" in report
    assert "| tie rate | HPA, ties ½ |" in report
    trained = [r for r in RUNS if r.trains]
    budget = json.loads((out / "metrics.json").read_text())["reward_budget"]
    assert budget["budget_cpu_seconds"] == cfg.reward.budget_cpu_seconds and set(budget["runs"]) == {
        r.name for r in trained
    }
    for run in trained:
        assert report.count(f"| {run.label} |") == 3, run.label  # metric, per-dimension and budget tables
        log = json.loads((out / "reward" / run.name / "metrics.json").read_text())
        train_cfg = (out / "reward" / run.name / "config.yaml").read_text()
        assert "val.jsonl" in train_cfg, run.name
        assert [r["step"] for r in log["eval"]] == [1, 2], run.name  # 2 steps, val_points 2
        for row in log["train"] + log["eval"]:
            assert row["cpu_seconds"] > 0 and row["wall_seconds"] > 0, (run.name, row)
        row = budget["runs"][run.name]
        assert row["cpu_seconds"] == log["clock"]["cpu_seconds"] > 0
        assert row["share_of_budget"] == pytest.approx(row["cpu_seconds"] / cfg.reward.budget_cpu_seconds)
        assert row["val_curve"]["cpu_seconds"] == [r["cpu_seconds"] for r in log["eval"]]
        assert f"| {run.label} | {row['steps']} | {row['cpu_seconds']:.0f} |" in report
    for ref in ("latent", "pixel_oracle"):
        overall = results["world"]["reference"][ref]["overall"]
        assert overall["hpa_ties_half"] == pytest.approx(overall["hpa"] + overall["tie_rate"] / 2)


def test_smoke_report_gives_the_generator_gate_rows_and_states_a_failure_first(smoke_run):
    cfg, out, results = smoke_run
    gate = results["generator"]["gate"]
    assert gate["split"] == "test" and gate["seeds"] == list(cfg.generator.gate.seeds)
    assert gate["images"] == gate["prompts"] * len(cfg.generator.gate.seeds)
    assert set(gate["checks"]) == {"alignment", "aggregate_ratio"}
    ratio = gate["generated"]["aggregate"] / gate["render_means"]["aggregate"]
    assert gate["checks"]["aggregate_ratio"]["value"] == pytest.approx(ratio)
    assert gate["checks"]["alignment"]["threshold"] == cfg.generator.gate.min_alignment
    assert gate["passed"] == all(c["passed"] for c in gate["checks"].values())
    report = (out / "report.md").read_text()
    rows = json.loads((out / "metrics.json").read_text())["gates"]
    attrs = ("count", "colour", "shape", "position", "background")
    assert [r["gate"] for r in rows] == [
        *(f"VLM {role}: {a} named right" for role in ("teacher", "student") for a in attrs),
        "generator: oracle alignment mean",
        "generator: oracle aggregate / renders' aggregate",
    ]
    for r in rows:
        assert f"| {r['gate']} |" in report and isinstance(r["passed"], bool)
    for role, threshold in (("teacher", cfg.vlm.gate.teacher_min), ("student", cfg.vlm.gate.student_min)):
        perception = results["vlm"][role]["perception"]
        for a in attrs:
            row = next(r for r in rows if r["gate"] == f"VLM {role}: {a} named right")
            value = perception[f"{a}_accuracy"]
            assert row["value"] == f"{value:.3f}" and row["threshold"] == f">= {threshold:.2f}"
            assert row["passed"] == (value >= threshold)
            result = "pass" if row["passed"] else "**FAIL**"
            assert (
                f"| {row['gate']} | {row['on']} | {row['value']} | {row['threshold']} | {result} |" in report
            )
    failed = [r["gate"] for r in rows if not r["passed"]]
    assert ("gate(s) FAILED" in report) == bool(failed)
    if failed:  # stated before any result section
        assert report.index("gate(s) FAILED") < report.index("## 1.")
        assert all(name in report.split("## 1.")[0] for name in failed)


def test_smoke_indomain_records_validate_and_every_reward_model_is_scored_on_them(smoke_run):
    from zr_diffusion.data import load_records
    from zr_diffusion.reward.config import TrainRewardConfig
    from zr_diffusion.synthetic.demo_reward import TEST_SETS

    cfg, out, results = smoke_run
    samples = results["indomain"]["samples"]
    world = Path(results["world"]["data"])
    n_prompts = results["world"]["prompts"]
    k_test = cfg.world.annotators_per_test_item
    dims = len(cfg.world.dimensions)
    for split, per_prompt, k in (
        ("train", cfg.indomain.train_per_prompt, 1),
        ("test", cfg.indomain.test_per_prompt, k_test),
    ):
        records = load_records(samples[split], require_rationale=True)  # images exist, scores on the grid
        assert len(records) == n_prompts[split] * per_prompt * dims == samples[f"{split}_records"]
        assert {len(r.scores) for r in records} == {k}
        assert all(r.image.suffix == ".png" and r.id.startswith(f"gen-{split}-") for r in records)
    world_train = load_records(world / "train.jsonl")
    merged = load_records(samples["train_merged"])
    assert [r.id for r in merged] == [r.id for r in world_train] + [
        r.id for r in load_records(samples["train"])
    ]
    from zr_diffusion.config import load_config

    gdso = load_config(TrainRewardConfig, out / "reward" / "gdso" / "config.yaml")
    assert gdso.data.train == samples["train_merged"]
    report = (out / "report.md").read_text()
    assert "| gen. HPA | gen. ties |" in report
    metrics = json.loads((out / "metrics.json").read_text())
    for run in RUNS:
        summary = metrics["stages"]["reward"]["runs"][run.name]
        for sub in TEST_SETS.values():
            assert (out / "reward" / run.name / sub / "predictions.jsonl").is_file()
            assert {"hpa", "tie_rate"} <= set(summary[sub]["metrics"]["overall"])
        assert summary["eval_generated"]["metrics"]["overall"]["records"] == samples["test_records"]


def test_smoke_zreward_run_has_its_guardrails_and_gsb_compares_the_selected_lora(smoke_run):
    cfg, out, results = smoke_run
    zr = results["generator"]["zreward"]
    sel, v = zr["selection"], cfg.generator.zreward["validation"]
    assert sel["select_by"] == v["select_by"] == "teacher_sft" and zr["lora"] == sel["lora"]
    assert zr["lora"] == str(out / "generator" / "zreward" / "best")
    run_cfg = (out / "generator" / "zreward" / "config.yaml").read_text()
    assert str(out / "reward" / "teacher_sft") in run_cfg and "prompts_val.txt" in run_cfg
    assert "reg_weight: 1.0" in run_cfg
    val_prompts = (out / "generator" / "prompts_val.txt").read_text().split("\n")[:-1]
    rows = [json.loads(line) for line in (out / "world" / "data" / "images.jsonl").read_text().splitlines()]
    assert set(val_prompts) == {r["prompt"] for r in rows if r["split"] == "val"}
    # the oracle of every validated LoRA (diagnostic), aligned with the run's validations
    validations = json.loads(Path(zr["train_metrics"]).read_text())["validation"]
    points = zr["oracle_by_step"]["points"]
    assert [p["step"] for p in points] == [e["step"] for e in validations]
    assert all(
        set(p["gold"]) == {*DIMENSIONS, "aggregate"} and "judge/teacher_sft" in p["judges"] for p in points
    )
    assert Path(zr["oracle_by_step"]["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert f"Z-Reward LoRA compared: step {sel['step']} of {zr['steps_run']} (`best/`)" in report
    assert "![oracle by step](generator/zreward/oracle_by_step.png)" in report


def test_smoke_rerun_skips_every_stage_and_says_so(smoke_run, capsys):
    from zr_diffusion.cli import main

    cfg, out, _ = smoke_run
    stamps = {s: (out / s / "done.json").stat().st_mtime_ns for s in STAGES}
    capsys.readouterr()
    assert main(["demo", "--preset", "smoke", f"output_dir={out}"]) == 0
    said = capsys.readouterr().out
    for stage in STAGES:
        assert f"stage {stage}: cached ({out / stage})" in said, said
        assert (out / stage / "done.json").stat().st_mtime_ns == stamps[stage]


def test_smoke_changed_setting_rebuilds_only_what_depends_on_it(smoke_run, capsys):
    cfg, out, _ = smoke_run
    capsys.readouterr()
    changed = load_demo_config("smoke", overrides=[f"output_dir={out}", "generator.gsb.raters_per_item=2"])
    results = demo(changed)
    said = capsys.readouterr().out
    for stage in ("world", "vlm", "indomain", "reward"):
        assert results[stage]["cached"], stage
    assert not results["generator"]["cached"] and not results["report"]["cached"]
    for step in ("generator/sft", "generator/zreward"):
        assert f"{step}: cached" in said
    assert results["generator"]["base"] == results["indomain"]["base"]  # one base generator, reused
    assert results["generator"]["gsb"]["raters_per_item"] == 2


def test_smoke_study_writes_seed_rows_cis_and_verdict_rows(smoke_run):
    """A 2-seed study in the smoke run's parent folder (seed 0 reused from the cache, seed 1 a new
    world), both seeds at once in their own processes (``--jobs 2``): structure of study.md only,
    never particular values."""
    from zr_diffusion.synthetic.study import CONFIRMED, CONTRADICTED, NOT_SHOWN
    from zr_diffusion.synthetic.study_report import REWARD_CLAIMS

    cfg, out, _ = smoke_run
    path = study(dataclasses.replace(cfg, output_dir=str(out.parent)), (0, 1), jobs=2)
    assert path == out.parent / "study.md" and (out.parent / "seed-1" / "report.md").is_file()
    # the seed's config went through YAML to its process unchanged: seed 0 reused its world and VLMs
    # (a test before may have changed a later stage's settings)
    log0 = (out / "demo.log").read_text()
    assert "stage world: cached (" in log0 and "stage vlm: cached (" in log0
    assert "stage world: cached" not in (out.parent / "seed-1" / "demo.log").read_text()
    lines = path.read_text().splitlines()
    # the gates come first: a row per gate of each seed's metrics.json, a pass / FAIL cell per seed,
    # and any failed gate named above the table
    gates_at = lines.index("## Gates: preconditions on the shared base models, per seed")
    assert gates_at < min(i for i, line in enumerate(lines) if line.startswith("## ") and i != gates_at)
    assert "| gate | measured on | threshold | seed 0 | seed 1 |" in lines
    for seed in (0, 1):
        names = [
            g["gate"] for g in json.loads((out.parent / f"seed-{seed}" / "metrics.json").read_text())["gates"]
        ]
        for name in names:
            row = next(line for line in lines if line.startswith(f"| {name} | "))
            assert row.count(" pass") + row.count("**FAIL**") == 2, row
    if any("**FAIL**" in line for line in lines[gates_at:] if line.startswith("| ")):
        assert any(line.startswith("> **") and "gate(s) FAILED" in line for line in lines[gates_at:])
    for seed in (0, 1):
        for run in RUNS:
            assert sum(line.startswith(f"| {seed} | {run.label} | ") for line in lines) == 1, (seed, run)
    for seed in (0, 1):  # HPA on the held-out generator samples too, one row per seed and model
        for run in RUNS:
            row = f"| {seed} | generator samples | {run.label} | "
            assert sum(line.startswith(row) for line in lines) == 1, (seed, run)
    # a row per model in the across-seed means and in the pooled (test split sizing) table
    means = [line for line in lines if line.startswith(tuple(f"| {run.label} | " for run in RUNS))]
    assert len(means) == 2 * len(RUNS) and all(line.count("[") == 1 for line in means)
    assert "| model | pooled HPA [95% CI] | half-width | ≤ 0.03 |" in lines
    assert all(line.endswith(("| yes |", "| **no** |")) for line in means[len(RUNS) :])
    warning = next(line for line in lines if line.startswith("**Warning:** seed 0 has "))
    assert "seed 1 has" in warning and "(fewer than 20)" in warning  # the smoke worlds have 2 test prompts
    assert (
        "| group | claim | seed 0: A − B [95% CI] | seed 1: A − B [95% CI] | across seeds | verdict |"
        in lines
    )
    verdict_rows = [line for line in lines if line.startswith(("| teacher |", "| student |"))]
    assert [row.split(" | ")[1] for row in verdict_rows] == [c.text for c in REWARD_CLAIMS]
    assert all(
        row.endswith((f"{CONFIRMED} |", f"{NOT_SHOWN} |", f"{CONTRADICTED} |")) for row in verdict_rows
    )
    assert all(row.count("[") == 3 for row in verdict_rows)  # two per-seed CIs and the across-seed CI
    gsb_row = next(line for line in lines if line.startswith("| GSB Z-Reward vs SFT > 0 |"))
    gsb_seed0 = json.loads((out / "generator" / "done.json").read_text())["summary"]["gsb"]["comparisons"]
    assert gsb_row.split(" | ")[1].startswith(f"{gsb_seed0['zreward_vs_sft']['gsb']:.3f} [")  # (G − B) / N
    dims = [line for line in lines if line.startswith("| oracle ")]
    assert len(dims) == 4 and all(line.count("[") == 3 for line in dims + [gsb_row])
    last = next(line for line in lines if line.startswith("| no oracle dimension of Z-Reward below SFT |"))
    assert last.endswith((f"{CONFIRMED} |", f"{NOT_SHOWN} |", f"{CONTRADICTED} |"))

    # the over-optimisation sweep: per seed and over the seeds, every reward x evaluation point
    sweep = cfg.sweep
    steps = list(range(0, sweep.steps + 1, sweep.every))
    for folder in (out, out.parent / "seed-1"):
        numbers = json.loads((folder / "overoptimisation.json").read_text())
        assert list(numbers["curves"]) == list(sweep.rewards)
        for points in numbers["curves"].values():
            assert [p["step"] for p in points] == steps and points[0]["deviation"] == 0.0
            assert all({"gold", "proxy", "deviation"} <= set(p) for p in points)
        assert (folder / "overoptimisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mean = json.loads((out.parent / "overoptimisation.json").read_text())["mean"]
    assert {n: [p["step"] for p in pts] for n, pts in mean.items()} == {n: steps for n in sweep.rewards}
    assert (out.parent / "overoptimisation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![overoptimisation](overoptimisation.png)" in lines
    labels = {r.name: r.label for r in RUNS}
    for name in sweep.rewards:
        section = lines[lines.index("## Over-optimisation (Gao et al. 2022)") :]
        row = next(line for line in section if line.startswith(f"| {labels[name]} (optimised) | "))
        assert row.split(" | ")[1] in {str(s) for s in steps}  # the step at which gold peaks
