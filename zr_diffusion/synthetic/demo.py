"""``zr demo``: the whole Z-Reward method end to end on a CPU, in the embedded synthetic world.

Stages (each writes under ``<output_dir>/<stage>/`` and, last and atomically, ``done.json``):

1. ``world``      the annotated reward dataset (train: one annotation; val/test: several annotators)
2. ``vlm``        a larger teacher and a smaller student VLM, built from config and pretrained here on
                  a perception task (describing world images and their defects)
3. ``reward``     zero-shot, SFT, RewardDance-style, GRPO and GDSO on the teacher; SFT, OPD and RISD on
                  the student (distilled from the GDSO teacher); every model evaluated on the
                  multi-annotator test split (PLCC, SRCC, HPA, margin HPA, tokens/call, images/s)
4. ``generator``  a tiny diffusers pipeline trained from scratch on world images of mixed quality; the
                  SFT baseline LoRA; the Z-Reward LoRA (reward gradients from the frozen RISD student);
                  GSB and per-dimension means judged by the oracle, never by a learned model
5. ``report``     ``report.md``, PNG figures and ``metrics.json``

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

from zr_diffusion.synthetic.gates import GeneratorGate
from zr_diffusion.synthetic.generator import GeneratorConfig
from zr_diffusion.synthetic.overopt import SweepSettings
from zr_diffusion.synthetic.pretrain import PretrainConfig
from zr_diffusion.synthetic.stages import Cache, Context
from zr_diffusion.synthetic.study import StudySettings
from zr_diffusion.synthetic.world import WorldConfig

STAGES = ("world", "vlm", "reward", "generator", "report")
PRESETS = ("default", "smoke")
PRESET_DIR = Path(__file__).resolve().parents[2] / "configs" / "demo"


# --------------------------------------------------------------------------------------------------
# config


def _pretrain(steps: int) -> PretrainConfig:
    return PretrainConfig(
        steps=steps, lr=3e-3, num_images=2048, eval_every=300, short_prompt_fraction=0.75, vision_lr_scale=3.0
    )


@dataclass
class VLMSettings:
    """The demo's base VLMs: tiny classes of one supported family, pretrained here on perception."""

    family: Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"] = "qwen2_vl"  # see the report
    teacher_size: Literal["tiny", "small"] = "small"
    student_size: Literal["tiny", "small"] = "tiny"
    # The processor's pixel budget: images are resized to at least this side (a 48 px world image is
    # upsampled to 112 px: 8 x 8 patches of 14 px, 16 vision tokens; the family's default gives 4).
    min_image_side: int = 112
    teacher_pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(1500))
    student_pretrain: PretrainConfig = field(default_factory=lambda: _pretrain(1200))
    perception_eval_images: int = 64  # greedy descriptions of validation renders, scored word by word

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
    }


@dataclass
class RewardSettings:
    """Settings of the reward runs. Each run's TrainRewardConfig is ``common`` merged with the run's
    own mapping (any TrainRewardConfig key; the demo fills in model, data, teacher, seed and output
    folder); ``eval`` holds EvalRewardConfig keys for every evaluation."""

    common: dict[str, Any] = field(default_factory=_reward_common)
    teacher_sft: dict[str, Any] = field(default_factory=lambda: {"method": "sft", "run": {"max_steps": 400}})
    rewarddance: dict[str, Any] = field(
        default_factory=lambda: {"method": "rewarddance", "run": {"max_steps": 400}}
    )
    grpo: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "grpo",
            "batch_size": 4,
            "gdso": {"group_size": 4},
            "policy_loss": {"aggregate": "sequence_mean"},  # the demo's lr was tuned on per-output means
            "run": {"max_steps": 80},
        }
    )
    gdso: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "gdso",
            "batch_size": 4,
            "gdso": {"group_size": 4},
            "policy_loss": {"aggregate": "sequence_mean"},  # the demo's lr was tuned on per-output means
            "run": {"max_steps": 80},
        }
    )
    student_sft: dict[str, Any] = field(default_factory=lambda: {"method": "sft", "run": {"max_steps": 400}})
    opd: dict[str, Any] = field(
        default_factory=lambda: {"method": "opd", "batch_size": 16, "run": {"max_steps": 100}}
    )
    risd: dict[str, Any] = field(
        default_factory=lambda: {
            "method": "risd",
            "run": {"max_steps": 400},
            "distill": {"teacher_rollouts": 1, "teacher_batch_size": 64},
        }
    )
    eval: dict[str, Any] = field(
        default_factory=lambda: {"batch_size": 16, "teacher_samples": 1, "rollout": {"max_new_tokens": 160}}
    )


@dataclass
class GSBSettings:
    """The oracle's A/B test of the generators on the held-out (test-split) prompts."""

    seeds: tuple[int, ...] = (0, 1, 2, 3)  # one item per (prompt, seed)
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
            "every": 10,  # steps 0, 10, ..., 60
            "num_prompts": 12,  # all of the world's val prompts
            "seeds": [0, 1],  # fixed noise: the same 24 items at every validation
            "batch_size": 12,
            # held out: a judge named for a reward run reads its model. The Teacher SFT model (score-
            # first): not optimised, not the oracle, a larger VLM trained on the annotations alone, so
            # its errors share the least with the RISD student (distilled via the GDSO teacher)
            "judges": {"teacher_sft": {"kind": "zreward"}},
            "select_by": "teacher_sft",  # GSB compares this selected LoRA (best/)
            "patience": 3,  # stop after 3 validations (30 steps) without a better judge score
            "keep_loras": True,  # for the oracle-vs-step diagnostic (never used to select)
        },
        "run": {"max_steps": 60, "device": "cpu", "tensorboard": False, "keep_checkpoints": 1},
    }


@dataclass
class T2ISettings:
    """The generator stage: from-scratch training, its gate, the SFT baseline, the Z-Reward LoRA, GSB.

    ``sft`` holds SFTT2IConfig keys and ``zreward`` FinetuneT2IConfig keys (the demo fills in the
    pipeline, records, prompts, reward model, image size, seed and output folder). The Z-Reward LoRA
    is trained on top of the SFT model (its LoRA fused in), as the paper tunes its SFT model.
    """

    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
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
        default_factory=lambda: WorldConfig(image_size=48, num_prompts=120, test_fraction=0.15)
    )
    vlm: VLMSettings = field(default_factory=VLMSettings)
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
    from zr_diffusion.synthetic import demo_reward, demo_t2i, demo_world, report

    return {
        "world": demo_world.run_world,
        "vlm": demo_world.run_vlm,
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


def study(cfg: DemoConfig, seeds: tuple[int, ...], fresh: bool = False) -> Path:
    """Run (or reuse) the demo once per seed into ``<output_dir>/seed-<k>``, then write
    ``<output_dir>/study.md``: per-seed rows, CIs and verdicts, reward models then generator
    (synthetic/study_report.py), then (``sweep.enabled``) the over-optimisation sweep of each seed and
    its figure over the seeds (synthetic/overopt.py)."""
    from zr_diffusion.io import atomic_write_text
    from zr_diffusion.synthetic.demo_reward import RUNS
    from zr_diffusion.synthetic.overopt import run_sweep, study_sweep_markdown
    from zr_diffusion.synthetic.study_report import generator_study_markdown, reward_study_markdown

    root = Path(cfg.output_dir)
    dirs = {s: root / f"seed-{s}" for s in seeds}
    for s in seeds:
        seed_cfg = dataclasses.replace(cfg, seed=s, output_dir=str(dirs[s]))
        results = demo(seed_cfg, fresh=fresh)
        if cfg.sweep.enabled:
            run_sweep(Context(seed_cfg, Cache(dirs[s]), dirs[s], results))
    labels = {r.name: r.label for r in RUNS}
    head = f"# zr demo study: preset {cfg.preset}, seeds {', '.join(map(str, seeds))}\n\n"
    body = "".join(f"- seed {s}: {dirs[s] / 'report.md'}\n" for s in seeds)
    tables = reward_study_markdown(dirs, labels, cfg.study) + "\n" + generator_study_markdown(dirs, cfg.study)
    if cfg.sweep.enabled:
        tables += "\n" + study_sweep_markdown(dirs, root)
    atomic_write_text(root / "study.md", head + body + "\n" + tables)
    print(f"zr demo: study of {len(seeds)} seed(s); report {root / 'study.md'}")
    return root / "study.md"


def cli_run(args: argparse.Namespace) -> int:
    """``zr demo [--preset P] [--config FILE] [--fresh] [--seeds 0,1,2] [key=value ...]`` (arguments:
    cli.COMMANDS)."""
    cfg = load_demo_config(args.preset, args.config, args.overrides)
    if args.seeds is None:
        demo(cfg, fresh=args.fresh)
    else:
        study(cfg, parse_seeds(args.seeds), fresh=args.fresh)
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
    "study",
]
