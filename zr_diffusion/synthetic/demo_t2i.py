"""``zr demo`` stage 4: a generator trained from scratch, the SFT baseline, the Z-Reward LoRA, GSB.

Steps (each cached on its own):

- the base generator and its gate come from the ``indomain`` stage (:mod:`synthetic.indomain`:
  ``indomain/base``, ``indomain/gate``), trained and measured once;
- ``generator/sft``      the SFT baseline: :func:`pipelines.sft.train_t2i_sft` (LoRA, denoising loss)
                         on the annotator-preferred training images (``min_score`` on the mean
                         annotated score);
- ``generator/zreward``  the SFT LoRA fused into the base, then :func:`pipelines.reward_finetune.
                         finetune_t2i` with the frozen RISD student as the differentiable reward,
                         the toolkit's guardrails on (validation on the world's val prompts with fixed
                         noise, a held-out judge selecting ``best/`` with early stopping, the
                         regulariser) and, diagnostic only, the oracle's score of every validated LoRA;
- ``generator/gsb``      base, SFT and Z-Reward (the selected LoRA, ``best/``) generate the held-out (test-split) prompts from the
                         same noise; GSB by oracle annotators and the oracle's mean score per
                         dimension (:mod:`synthetic.oracle_gsb`); the RISD student's own scores beside
                         them, so that reward hacking would show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from zr_diffusion.synthetic.stages import deep_merge, write_run_config

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context

VARIANTS = ("base", "sft", "zreward")
COMPARISONS = (("zreward", "sft"), ("sft", "base"), ("zreward", "base"))  # (A, B): GSB of A against B


def _world_paths(ctx: Context) -> tuple[Path, Path]:
    world_dir = Path(ctx.results["world"]["data"]).parent
    return Path(ctx.results["world"]["data"]), world_dir


def _sft(ctx: Context, folder: Path, pipeline: str) -> dict:
    from zr_diffusion.pipelines.config import SFTT2IConfig
    from zr_diffusion.pipelines.sft import load_sft_examples, train_t2i_sft

    cfg = ctx.cfg
    data, _ = _world_paths(ctx)
    size = cfg.world.image_size
    filled = {
        "pipeline": pipeline,
        "records": str(data / "train.jsonl"),
        "height": size,
        "width": size,
        "run": {"output_dir": str(folder), "seed": cfg.seed},
    }
    sft_cfg = write_run_config(
        SFTT2IConfig, deep_merge(cfg.generator.sft, filled), folder / "config_demo.yaml"
    )
    examples = load_sft_examples(sft_cfg.records, sft_cfg.min_score, sft_cfg.score_dimensions)
    all_examples = load_sft_examples(sft_cfg.records)
    final = train_t2i_sft(sft_cfg)
    return {
        "lora": str(folder / "final"),
        "examples": len(examples),
        "candidate_images": len(all_examples),
        "min_score": sft_cfg.min_score,
        "final_loss": final.get("loss"),
        "train_metrics": str(folder / "metrics.json"),
    }


def write_val_prompts(ctx: Context) -> Path:
    """The world's validation-split prompts, one a line, in ``generator/prompts_val.txt``."""
    from zr_diffusion.io import atomic_write_text

    data, _ = _world_paths(ctx)
    rows = [json.loads(line) for line in (data / "images.jsonl").read_text().splitlines()]
    path = ctx.dir("generator") / "prompts_val.txt"
    atomic_write_text(path, "\n".join(sorted({r["prompt"] for r in rows if r["split"] == "val"})) + "\n")
    return path


def zreward_config(ctx: Context, folder: Path, pipeline: str, reward_model: str, settings: dict):
    """The FinetuneT2IConfig of a Z-Reward run: ``settings`` (FinetuneT2IConfig keys) with the training
    and validation prompts, the reward model, each judge named for a reward run (its model folder),
    the image size, seed and output folder filled in; written as ``config_demo.yaml``."""
    from zr_diffusion.pipelines.config import FinetuneT2IConfig

    cfg = ctx.cfg
    _, world_dir = _world_paths(ctx)
    size = cfg.world.image_size
    runs = ctx.results["reward"]["runs"]
    judges = settings.get("validation", {}).get("judges", {})
    for name, judge in judges.items():
        if not judge.get("path") and name not in runs:
            raise ValueError(
                f"generator.zreward.validation.judges.{name}: give a path, or name a reward run "
                f"(its model is read): {sorted(runs)}"
            )
    filled = {
        "pipeline": str(pipeline),
        "prompts": str(world_dir / "prompts_train.txt"),
        "reward": {"model": reward_model},
        "sampler": {"height": size, "width": size},
        "validation": {
            "prompts": str(write_val_prompts(ctx)),
            "judges": {n: {"path": runs[n]["model"]} for n in judges if not judges[n].get("path")},
        },
        "run": {"output_dir": str(folder), "seed": cfg.seed},
    }
    return write_run_config(FinetuneT2IConfig, deep_merge(settings, filled), folder / "config_demo.yaml")


def _oracle_by_step(ctx: Context, folder: Path, ft_cfg, pipeline: str, selected: int | None) -> dict:
    """Diagnostic only, never used to select: the oracle's mean score of every validation step's LoRA
    on the same items, beside the proxy reward and the judge (``oracle_by_step.json`` / ``.png``)."""
    from zr_diffusion.io import atomic_write_json
    from zr_diffusion.synthetic.overopt import eval_items, plot_oracle_by_step, points_of_run

    data, _ = _world_paths(ctx)
    points = points_of_run(folder, pipeline, eval_items(ft_cfg, scenes_by_prompt(data)), probe=None)
    atomic_write_json(folder / "oracle_by_step.json", points)
    plot_oracle_by_step(points, folder / "oracle_by_step.png", selected)
    return {
        "points": points,
        "json": str(folder / "oracle_by_step.json"),
        "png": str(folder / "oracle_by_step.png"),
    }


def _zreward(ctx: Context, folder: Path, pipeline: str, sft_lora: str, reward_model: str) -> dict:
    from zr_diffusion.pipelines.reward_finetune import finetune_t2i
    from zr_diffusion.synthetic.generator import merge_lora

    sft_pipeline = merge_lora(pipeline, sft_lora, folder / "sft_pipeline")
    ft_cfg = zreward_config(ctx, folder, sft_pipeline, reward_model, ctx.cfg.generator.zreward)
    final = finetune_t2i(ft_cfg)
    metrics = json.loads((folder / "metrics.json").read_text())
    train = metrics.get("train", [])
    selection = metrics.get("selection")
    if ft_cfg.validation.select_by is not None and (selection is None or selection["lora"] is None):
        raise RuntimeError(f"{folder / 'metrics.json'}: the run kept no selected LoRA in best/")
    out = {
        "pipeline": str(sft_pipeline),
        # the LoRA that GSB compares: validation's selected step (best/), else the last step's
        "lora": selection["lora"] if selection else str(folder / "final"),
        "final_lora": str(folder / "final"),
        "selection": selection,
        "stopped_early": metrics.get("stopped_early"),
        "hacking_warnings": len(metrics.get("hacking_warnings", [])),
        "steps_run": train[-1]["step"] if train else 0,
        "reward_first": train[0]["reward"] if train else None,
        "reward_last": final.get("reward"),
        "train_metrics": str(folder / "metrics.json"),
    }
    if ft_cfg.validation.enabled and ft_cfg.validation.keep_loras:
        selected = selection["step"] if selection else None
        out["oracle_by_step"] = _oracle_by_step(ctx, folder, ft_cfg, str(sft_pipeline), selected)
    return out


def scenes_by_prompt(data: Path) -> dict:
    """Every prompt of the world dataset at ``data`` (all splits) and its scene (:func:`gates.prompt_scenes`)."""
    from zr_diffusion.synthetic.gates import prompt_scenes

    return prompt_scenes([json.loads(line) for line in (data / "images.jsonl").read_text().splitlines()])


def _gsb(ctx: Context, folder: Path, variants: dict, reward_model: str) -> dict:
    from zr_diffusion.io import atomic_write_json
    from zr_diffusion.pipelines.gsb import write_review_page
    from zr_diffusion.pipelines.prompts import load_prompts
    from zr_diffusion.pipelines.sampler import SamplerConfig
    from zr_diffusion.rubric import DIMENSIONS
    from zr_diffusion.synthetic.oracle_gsb import (
        generate_variant,
        gsb_counts,
        mean_by_dimension,
        oracle_table,
        rater_verdicts,
        reward_table,
        save_items,
    )

    cfg = ctx.cfg
    gs = cfg.generator.gsb
    data, world_dir = _world_paths(ctx)
    prompts = load_prompts(world_dir / "prompts_test.txt")
    scenes = scenes_by_prompt(data)
    items = [(p, s) for s in gs.seeds for p in prompts]  # seed-major, as generate() orders them
    item_prompts = [p for p, _ in items]
    item_scenes = [scenes[p] for p in item_prompts]
    size = cfg.world.image_size
    sampler = SamplerConfig(num_steps=gs.num_steps, guidance_scale=gs.guidance_scale, height=size, width=size)
    images, oracle, reward = {}, {}, {}
    for name, variant in variants.items():
        images[name] = generate_variant(variant, prompts, gs.seeds, sampler, gs.batch_size)
        save_items(folder / f"images_{name}.safetensors", images[name])
        oracle[name] = oracle_table(images[name], item_scenes)
        mu = reward_table(reward_model, images[name], item_prompts, gs.batch_size)  # [N, D]
        reward[name] = {d: float(mu[:, k].mean()) for k, d in enumerate(DIMENSIONS)}
        reward[name]["aggregate"] = float(mu.mean())
        del mu
    comparisons = {}
    for a, b in COMPARISONS:
        judged = rater_verdicts(
            oracle[a], oracle[b], cfg.world_config(), gs.raters_per_item, cfg.seed, f"{a}-{b}"
        )
        comparisons[f"{a}_vs_{b}"] = gsb_counts([j["verdict"] for j in judged]) | {"a": a, "b": b}
        atomic_write_json(
            folder / f"verdicts_{a}_vs_{b}.json",
            [{"prompt": p, "seed": s} | j for (p, s), j in zip(items, judged)],
        )
    write_review_page(
        folder / "review",
        item_prompts,
        images["zreward"],
        images["sft"],
        seed=cfg.seed,
        key_path=folder / "review.key.json",
    )
    summary = {
        "items": len(items),
        "prompts": len(prompts),
        "seeds": list(gs.seeds),
        "raters_per_item": gs.raters_per_item,
        "tie_margin": cfg.world.judge_tie_margin,
        "comparisons": comparisons,
        "oracle_means": {n: mean_by_dimension(rows) for n, rows in oracle.items()},
        "student_reward_means": reward,
        "images": {n: str(folder / f"images_{n}.safetensors") for n in variants},
        "item_prompts": item_prompts,
        "review_page": str(folder / "review" / "index.html"),
    }
    atomic_write_json(folder / "oracle_scores.json", {n: rows for n, rows in oracle.items()})
    return summary


def run_generator(ctx: Context, folder: Path) -> dict:
    from zr_diffusion.synthetic.oracle_gsb import Variant

    cfg = ctx.cfg
    world_hash = ctx.results["world"]["hash"]
    gen = cfg.generator
    base, gate = ctx.results["indomain"]["base"], ctx.results["indomain"]["gate"]  # one base generator
    sft = ctx.cache.run(
        "generator/sft",
        {"sft": gen.sft, "base": base["hash"], "world": world_hash, "seed": cfg.seed},
        lambda d: _sft(ctx, d, base["pipeline"]),
    )
    runs = ctx.results["reward"]["runs"]
    risd = runs["risd"]
    judged = gen.zreward.get("validation", {}).get("judges", {})
    judges = {
        n: runs[n]["hash"] if n in runs else j.get("path") for n, j in judged.items()
    }  # what each reads
    zr = ctx.cache.run(
        "generator/zreward",
        {
            "zreward": gen.zreward,
            "sft": sft["hash"],
            "reward": risd["hash"],
            "judges": judges,
            "seed": cfg.seed,
        },
        lambda d: _zreward(ctx, d, base["pipeline"], sft["lora"], risd["model"]),
    )
    variants = {
        "base": Variant("base", base["pipeline"]),
        "sft": Variant("SFT", base["pipeline"], sft["lora"]),
        "zreward": Variant("Z-Reward", zr["pipeline"], zr["lora"]),
    }
    gsb = ctx.cache.run(
        "generator/gsb",
        {
            "gsb": gen.gsb,
            "steps": [base["hash"], sft["hash"], zr["hash"]],
            "world": world_hash,
            "seed": cfg.seed,
        },
        lambda d: _gsb(ctx, d, variants, risd["model"]),
    )
    main = gsb["comparisons"]["zreward_vs_sft"]
    om = gsb["oracle_means"]
    checks = gate["checks"]
    line = (
        f"generator gate {'passed' if gate['passed'] else 'FAILED'} (oracle alignment "
        f"{checks['alignment']['value']:.2f}, aggregate {checks['aggregate_ratio']['value']:.0%} of the renders'); "
        f"GSB Z-Reward vs SFT {main['gsb']:+.1%} (G {main['good']} / S {main['same']} / B {main['bad']}, "
        f"oracle raters); oracle aggregate base {om['base']['aggregate']:.2f}, SFT {om['sft']['aggregate']:.2f}, "
        f"Z-Reward {om['zreward']['aggregate']:.2f}"
    )
    return {"line": line, "base": base, "gate": gate, "sft": sft, "zreward": zr, "gsb": gsb}


__all__ = [
    "COMPARISONS",
    "VARIANTS",
    "run_generator",
    "scenes_by_prompt",
    "write_val_prompts",
    "zreward_config",
]
