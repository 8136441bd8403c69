"""``zr demo``: the whole Z-Reward method end to end on a CPU, in the embedded synthetic world.

Stages (each writes under ``<output_dir>/<stage>/`` and, last and atomically, ``done.json``):

1. ``world``      the annotated reward dataset (train: one annotation; val/test: several annotators)
2. ``vlm``        a larger teacher and a smaller student VLM, built from config and pretrained here on
                  a perception task (describing world images and their defects); perception gates
3. ``indomain``   the base generator (trained from scratch once), its gate, and its samples of the
                  training and test prompts annotated by the world's annotators (in-domain reward data)
4. ``reward``     zero-shot, SFT, RewardDance-style, GRPO and GDSO on the teacher; SFT, OPD and RISD on
                  the student (distilled from the GDSO teacher); every model evaluated on the
                  multi-annotator test split (PLCC, SRCC, HPA, margin HPA, tokens/call, images/s) and
                  on the annotated generator samples; trained on world + generator training records
5. ``generator``  on the base generator of ``indomain``: the SFT baseline LoRA; the Z-Reward LoRA
                  (reward gradients from the frozen RISD student); GSB and per-dimension means judged
                  by the oracle, never by a learned model
6. ``report``     ``report.md``, PNG figures and ``metrics.json``

A rerun skips every finished stage (and every finished run inside a stage) whose configuration hash
is unchanged, saying so; ``--fresh`` rebuilds everything; a changed config or seed rebuilds what
depends on it. All recipes are driven through their config dataclasses, as a user would: each run's
config is written as YAML next to its outputs (``zr train-reward --config <run>/config.yaml``
reproduces it).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from zr_diffusion.synthetic.gates import GeneratorGate, VLMGate
from zr_diffusion.synthetic.generator import GeneratorConfig
from zr_diffusion.synthetic.indomain import InDomainSettings
from zr_diffusion.synthetic.overopt import SweepSettings
from zr_diffusion.synthetic.pretrain import PretrainConfig
from zr_diffusion.synthetic.stages import Cache, Context
from zr_diffusion.synthetic.study import StudySettings
from zr_diffusion.synthetic.world import WorldConfig

STAGES = ("world", "vlm", "indomain", "reward", "generator", "report")
PRESETS = ("default", "smoke")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"


# --------------------------------------------------------------------------------------------------
# config


def _pretrain(steps: int) -> PretrainConfig:
    return PretrainConfig(
        steps=steps,
        lr=3e-3,
        num_images=2048,
        corpus="grammar",
        eval_every=300,
        short_prompt_fraction=0.75,
        vision_lr_scale=3.0,
        contents_weight=5.0,
    )


@dataclass
class VLMSettings:
    """The demo's base VLMs: tiny classes of one supported family, pretrained here on perception."""

    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"] = "qwen2_vl"  # see the report
    teacher_size: Literal["tiny", "small"] = "small"
    # the tiny size's 16-wide, 1-layer vision tower named colours right in 11% of held-out renders
    # (world seed 0, 2026-12-03), the small one in 92%: the student is small too, and stays the compact
    # one by answering in one step, without reasoning
    student_size: Literal["tiny", "small"] = "small"
    # The processor's pixel budget: images are resized to at least this side (a 48 px world image is
    # upsampled to 112 px: 8 x 8 patches of 14 px, 16 vision tokens; the family's default gives 4).
    min_image_side: int = 112
    teacher_pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(2000))
    student_pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(2000))
    # greedy descriptions of validation renders, scored word by word (at 128, one accuracy near 0.9
    # has a 95% CI of about ±0.05)
    perception_eval_images: int = 128
    gate: VLMGate = field(default_factory=VLMGate)  # thresholds fixed by issue 12 §1

    def __post_init__(self) -> None:
        if self.min_image_side < 28:
            raise ValueError(
                f"vlm.min_image_side must be >= 28 (one merged vision token), got {self.min_image_side}"
            )


def _reward_common() -> dict[str, Any]:
    return {
        "dtype": "float32",
        "batch_size": 32,
        "eval_batch_size": 16,
        "lora": {"enabled": False},  # full fine-tuning (the models are tiny)
        "train_vision_tower": True,  # the tiny vision towers see little after pretraining; let every method adapt them
        "optim": {"lr": 1.0e-3, "schedule": "cosine", "warmup_steps": 10},
        "rollout": {"max_new_tokens": 160, "temperature": 1.0},
        "run": {"device": "cpu", "tensorboard": False, "progress": True, "keep_checkpoints": 1},
        # validation curves on the world's val split (the demo fills in data.eval): its first 96 records,
        # 6 prompts x 4 images x 4 dimensions; a teacher-mode evaluation samples one ~160-token
        # reasoning per record, so 5 of them cost about 1.7 test-split evaluations (288 records)
        "data": {"max_eval_records": 96},
    }


@dataclass
class RewardSettings:
    """Settings of the reward runs. Each run's TrainRewardConfig is ``common`` merged with the run's
    own mapping (any TrainRewardConfig key; the demo fills in model, data, teacher, seed and output
    folder); ``eval`` holds EvalRewardConfig keys for every evaluation."""

    common: dict[str, Any] = field(default_factory=_reward_common)
    teacher_sft: dict[str, Any] = field(default_factory=lambda: {"method": "sft", "run": {"max_steps": 175}})
    rewarddance: dict[str, Any] = field(
        default_factory=lambda: {"method": "rewarddance", "run": {"max_steps": 140}}
    )
    grpo: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "grpo",
            "batch_size": 4,
            "gdso": {"group_size": 4},
            "run": {"max_steps": 24},
        }
    )
    gdso: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "gdso",
            "batch_size": 4,
            "gdso": {"group_size": 4},
            "run": {"max_steps": 24},
        }
    )
    student_sft: dict[str, Any] = field(default_factory=lambda: {"method": "sft", "run": {"max_steps": 175}})
    opd: dict[str, Any] = field(
        default_factory=lambda: {"method": "opd", "batch_size": 16, "run": {"max_steps": 28}}
    )
    risd: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "risd",
            "run": {"max_steps": 175},
            "distill": {"teacher_rollouts": 1, "teacher_batch_size": 64},
        }
    )
    eval: dict[str, Any] = field(
        default_factory=lambda: {"batch_size": 16, "teacher_samples": 1, "rollout": {"max_new_tokens": 160}}
    )
    # one training CPU-seconds budget per trained model; the runs' max_steps are set to meet it, and the
    # report flags any run outside ±25% (zr_diffusion/synthetic/budget.py). 70 s: e.g. GDSO's 24 steps at
    # the 2.9 CPU s/step measured on 2026-12-03 (threads=1), set by the time targets of the demo
    budget_cpu_seconds: float = 70.0
    val_points: int = 5  # validation evaluations per run: run.eval_every = max_steps // val_points

    def __post_init__(self) -> None:
        if not self.budget_cpu_seconds > 0:
            raise ValueError(f"reward.budget_cpu_seconds = {self.budget_cpu_seconds}: give CPU seconds > 0")
        if self.val_points < 1:
            raise ValueError(f"reward.val_points = {self.val_points}: give at least 1 validation evaluation")


@dataclass
class GSBSettings:
    """The oracle's A/B test of the generators on the held-out (test-split) prompts."""

    seeds: tuple[int, ...] = (0, 1)  # one item per (prompt, seed)
    num_steps: int = 20  # DDIM steps
    guidance_scale: float = 3.0
    raters_per_item: int = 3  # oracle annotators per item; the item's verdict is their majority
    batch_size: int = 32
    grid_prompts: int = 8  # prompts shown in the SFT vs Z-Reward sample grid

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("generator.gsb.seeds: give at least one seed")
        if self.raters_per_item < 1 or self.num_steps < 1 or self.batch_size < 1 or self.grid_prompts < 1:
            raise ValueError(
                "generator.gsb: raters_per_item, num_steps, batch_size, grid_prompts must be >= 1"
            )


def _t2i_sft() -> dict[str, Any]:
    return {
        "min_score": 4.0,  # the annotator-preferred images: mean annotated score over dimensions >= 4
        "batch_size": 16,
        "lora": {"rank": 8, "alpha": 8.0},
        "optim": {"lr": 1.0e-3},
        "run": {"max_steps": 100, "device": "cpu", "tensorboard": False, "keep_checkpoints": 1},
    }


def _t2i_zreward() -> dict[str, Any]:
    return {
        "batch_size": 8,
        "lora": {"rank": 8, "alpha": 8.0},
        "optim": {"lr": 1.0e-3},
        "sampler": {"num_steps": 20, "guidance_scale": 3.0, "mode": "draft", "draft_k": 1},
        "reg_weight": 1.0,  # the regulariser at the README's starting point
        "validation": {  # the toolkit's guardrails (the demo fills in the val prompt file, judge folders)
            "enabled": True,
            "every": 10,  # steps 0, 10, ..., 40
            "num_prompts": 12,  # all of the world's val prompts
            "seeds": [0, 1],  # fixed noise: the same 24 items at every validation
            "batch_size": 12,
            # held out: a judge named for a reward run reads its model. The Teacher SFT model (score-
            # first): not optimised, not the oracle, the teacher VLM trained on the annotations alone, so
            # its errors share the least with the RISD student (distilled via the GDSO teacher)
            "judges": {"teacher_sft": {"kind": "zreward"}},
            "select_by": "teacher_sft",  # GSB compares this selected LoRA (best/)
            "patience": 3,  # stop after 3 validations (30 steps) without a better judge score
            "keep_loras": True,  # for the oracle-vs-step diagnostic (never used to select)
        },
        "run": {"max_steps": 40, "device": "cpu", "tensorboard": False, "keep_checkpoints": 1},
    }


@dataclass
class T2ISettings:
    """The generator stage: from-scratch training, its gate, the SFT baseline, the Z-Reward LoRA, GSB.

    ``sft`` holds SFTT2IConfig keys and ``zreward`` FinetuneT2IConfig keys (the demo fills in the
    pipeline, records, prompts, reward model, image size, seed and output folder). The Z-Reward LoRA
    is trained on top of the SFT model (its LoRA fused in), as the paper tunes its SFT model.
    """

    # the library's GeneratorConfig with fewer steps: the demo's time budget (its loss is flat by ~1100 steps)
    generator: GeneratorConfig = field(default_factory=lambda: GeneratorConfig(steps=1200, vae_steps=200))
    gate: GeneratorGate = field(default_factory=GeneratorGate)
    sft: dict[str, Any] = field(default_factory=_t2i_sft)
    zreward: dict[str, Any] = field(default_factory=_t2i_zreward)
    gsb: GSBSettings = field(default_factory=GSBSettings)


@dataclass
class DemoConfig:
    """``zr demo``: every knob of the end-to-end run (presets in configs/demo/)."""

    preset: str = "default"  # a name for the report; the values are what counts
    seed: int = 0  # the world and every run follow from it; another seed is an independent world
    output_dir: str = "runs/demo"
    threads: int = 2  # torch CPU threads
    world: WorldConfig = field(
        default_factory=lambda: WorldConfig(image_size=48, num_prompts=150, test_fraction=0.2)
    )
    vlm: VLMSettings = field(default_factory=VLMSettings)
    indomain: InDomainSettings = field(default_factory=InDomainSettings)  # annotated generator samples
    reward: RewardSettings = field(default_factory=RewardSettings)
    generator: T2ISettings = field(default_factory=T2ISettings)
    study: StudySettings = field(default_factory=StudySettings)  # CIs and verdicts of a multi-seed study
    sweep: SweepSettings = field(default_factory=SweepSettings)  # over-optimisation, in a study only

    def __post_init__(self) -> None:
        if self.world.seed != 0:
            raise ValueError(
                f"world.seed={self.world.seed}: the demo's world follows from the top-level seed; set "
                f"seed={self.world.seed} instead"
            )
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.world.image_size < 48:
            print(
                f"note: world.image_size={self.world.image_size}: the tiny VLMs see a {self.world.image_size} px "
                f"image as one vision token (48 or 64 px give four)"
            )

    def world_config(self) -> WorldConfig:
        return dataclasses.replace(self.world, seed=self.seed)


def load_demo_config(
    preset: str | None = "default", config: str | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> DemoConfig:
    """The demo config of a preset (configs/demo/<preset>.yaml) or a YAML file, plus overrides."""
    from zr_diffusion.config import load_config

    if config is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown demo preset {preset!r}; valid presets: {list(PRESETS)}")
        config = str(PRESET_DIR / f"{preset}.yaml")
        if not Path(config).is_file():
            raise FileNotFoundError(
                f"preset file {config} is missing (the presets live in the repository's configs/demo/)"
            )
    return load_config(DemoConfig, config, list(overrides))


# --------------------------------------------------------------------------------------------------
# the run


def _stage_functions() -> dict[str, Callable[[Context, Path], dict]]:
    from zr_diffusion.synthetic import demo_reward, demo_t2i, demo_world, indomain, report

    return {
        "world": demo_world.run_world,
        "vlm": demo_world.run_vlm,
        "indomain": indomain.run_indomain,
        "reward": demo_reward.run_reward,
        "generator": demo_t2i.run_generator,
        "report": report.run_report,
    }


def stage_key(ctx: Context, stage: str) -> dict:
    """What a stage's output depends on: its config section and the hashes of the stages before it."""
    cfg = ctx.cfg
    upstream = {s: ctx.results[s]["hash"] for s in STAGES[: STAGES.index(stage)] if s in ctx.results}
    section = {
        "world": {"world": cfg.world_config()},
        "vlm": {"vlm": cfg.vlm},
        "indomain": {
            "indomain": cfg.indomain,
            "generator": cfg.generator.generator,
            "gate": cfg.generator.gate,
        },
        "reward": {"reward": cfg.reward},
        "generator": {"generator": cfg.generator},
        "report": {"report": 1},
    }[stage]
    return {"stage": stage, "seed": cfg.seed, **section, "upstream": upstream}


def demo(cfg: DemoConfig, fresh: bool = False) -> dict:
    """Run (or reuse) every stage of the demo; returns ``{stage: summary}``."""
    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(cfg.threads)
    root = Path(cfg.output_dir)
    if fresh:
        for stage in STAGES:
            shutil.rmtree(root / stage, ignore_errors=True)
        for name in ("report.md", "metrics.json"):
            (root / name).unlink(missing_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    ctx = Context(cfg, Cache(root), root)
    tic = time.perf_counter()
    print(f"zr demo: preset {cfg.preset}, seed {cfg.seed}, output {root}")
    for stage, fn in _stage_functions().items():
        t0 = time.perf_counter()
        ctx.results[stage] = ctx.cache.run(
            stage, stage_key(ctx, stage), lambda folder, fn=fn: fn(ctx, folder), stage=True
        )
        if not ctx.results[stage]["cached"]:
            print(f"stage {stage}: {ctx.results[stage]['line']} ({time.perf_counter() - t0:.0f} s)")
    print(f"zr demo: done in {time.perf_counter() - tic:.0f} s; report {root / 'report.md'}")
    return ctx.results


# --------------------------------------------------------------------------------------------------
# command line


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds 0,1,2`` as distinct integers, in the order given."""
    try:
        seeds = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--seeds {text!r}: give comma-separated integers, e.g. --seeds 0,1,2") from None
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"--seeds {text!r}: each seed once (another seed is another world)")
    return seeds


def run_seed(cfg: DemoConfig, fresh: bool = False) -> dict:
    """One seed of a study: the demo, then (``sweep.enabled``) its over-optimisation sweep."""
    from zr_diffusion.synthetic.overopt import run_sweep

    results = demo(cfg, fresh=fresh)
    if cfg.sweep.enabled:
        root = Path(cfg.output_dir)
        run_sweep(Context(cfg, Cache(root), root, results))
    return results


def _run_seeds_in_parallel(configs: dict[int, DemoConfig], fresh: bool, jobs: int) -> None:
    """One ``python -m zr_diffusion.synthetic.demo <seed dir>/demo_config.yaml`` process per seed
    (:func:`run_seed`), ``jobs`` at a time; each writes its console output to ``<seed dir>/demo.log``.
    A failed seed stops the study, naming its log."""
    import subprocess
    import sys

    from zr_diffusion.config import save_config

    waiting = list(configs.items())
    running: dict[int, tuple[subprocess.Popen, Path]] = {}
    failed: list[str] = []
    while waiting or running:
        while waiting and len(running) < jobs:
            seed, seed_cfg = waiting.pop(0)
            folder = Path(seed_cfg.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            save_config(seed_cfg, folder / "demo_config.yaml")
            cmd = [sys.executable, "-m", "zr_diffusion.synthetic.demo", str(folder / "demo_config.yaml")]
            log = folder / "demo.log"
            with log.open("w") as handle:
                proc = subprocess.Popen(
                    cmd + (["--fresh"] if fresh else []),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            print(f"zr demo: seed {seed} started (pid {proc.pid}, log {log})")
            running[seed] = (proc, log)
        time.sleep(1.0)
        for seed, (proc, log) in list(running.items()):
            if proc.poll() is not None:
                del running[seed]
                print(f"zr demo: seed {seed} {'done' if proc.returncode == 0 else 'FAILED'}")
                if proc.returncode != 0:
                    failed.append(f"seed {seed} (exit {proc.returncode}, see {log})")
    if failed:
        raise RuntimeError(f"zr demo --seeds: {', '.join(failed)}")


def study(cfg: DemoConfig, seeds: tuple[int, ...], fresh: bool = False, jobs: int = 1) -> Path:
    """Run (or reuse) the demo once per seed into ``<output_dir>/seed-<k>``, then write
    ``<output_dir>/study.md``: each seed's gates, per-seed rows, CIs and verdicts, reward models then generator
    (synthetic/study_report.py). ``jobs > 1`` runs that many seeds at once, each in its own process
    with ``threads // jobs`` torch threads (at least 1; another thread count may change the last bits
    of floating-point sums, so compare seeds run with the same count). Then (``sweep.enabled``) each
    seed's over-optimisation sweep (in the seed's process) and its figure over the seeds
    (synthetic/overopt.py)."""
    from zr_diffusion.io import atomic_write_text
    from zr_diffusion.synthetic.demo_reward import RUNS
    from zr_diffusion.synthetic.overopt import study_sweep_markdown
    from zr_diffusion.synthetic.study_report import (
        gates_study_markdown,
        generated_hpa_markdown,
        generator_study_markdown,
        reward_study_markdown,
    )

    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    root = Path(cfg.output_dir)
    dirs = {s: root / f"seed-{s}" for s in seeds}
    if jobs == 1:
        for s in seeds:
            run_seed(dataclasses.replace(cfg, seed=s, output_dir=str(dirs[s])), fresh=fresh)
    else:
        threads = max(1, cfg.threads // jobs)
        configs = {
            s: dataclasses.replace(cfg, seed=s, output_dir=str(dirs[s]), threads=threads) for s in seeds
        }
        _run_seeds_in_parallel(configs, fresh, jobs)
    labels = {r.name: r.label for r in RUNS}
    head = f"# zr demo study: preset {cfg.preset}, seeds {', '.join(map(str, seeds))}\n\n"
    body = "".join(f"- seed {s}: {dirs[s] / 'report.md'}\n" for s in seeds)
    tables = (
        gates_study_markdown(dirs)
        + "\n"
        + reward_study_markdown(dirs, labels, cfg.study)
        + "\n"
        + generated_hpa_markdown(dirs, labels, cfg.study)
        + "\n"
        + generator_study_markdown(dirs, cfg.study)
    )
    if cfg.sweep.enabled:
        tables += "\n" + study_sweep_markdown(dirs, root)
    atomic_write_text(root / "study.md", head + body + "\n" + tables)
    print(f"zr demo: study of {len(seeds)} seed(s); report {root / 'study.md'}")
    return root / "study.md"


def cli_run(args: argparse.Namespace) -> int:
    """``zr demo [--preset P] [--config FILE] [--fresh] [--seeds 0,1,2 [--jobs N]] [key=value ...]`` (arguments:
    cli.COMMANDS)."""
    cfg = load_demo_config(args.preset, args.config, args.overrides)
    if args.seeds is None and args.jobs != 1:
        raise ValueError("--jobs runs the seeds of a study at once: give --seeds too")
    if args.seeds is None:
        demo(cfg, fresh=args.fresh)
    else:
        study(cfg, parse_seeds(args.seeds), fresh=args.fresh, jobs=args.jobs)
    return 0


__all__ = [
    "Cache",
    "DemoConfig",
    "GSBSettings",
    "RewardSettings",
    "T2ISettings",
    "VLMSettings",
    "cli_run",
    "demo",
    "load_demo_config",
    "parse_seeds",
    "run_seed",
    "study",
]


if __name__ == "__main__":  # one seed of a study, in its own process (_run_seeds_in_parallel)
    import sys

    from zr_diffusion.synthetic import demo as _module  # the importable module, not this __main__ copy

    _module.run_seed(_module.load_demo_config(config=sys.argv[1]), fresh="--fresh" in sys.argv[2:])
