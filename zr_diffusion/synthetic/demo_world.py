"""``zr demo`` stages 1 and 2: the world's reward dataset, and the base VLMs pretrained on perception.

The world stage also measures two references on the test split that no model can be expected to
beat by much: the latent true scores themselves (how well the multi-annotator ground truth agrees
with the truth it is a noisy view of), and the analytic pixel oracle (the non-learned measurement
the generator judges use).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from zr_diffusion.rubric import DIMENSIONS

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context

SPLITS = ("train", "val", "test")


def data_dir(ctx: Context) -> Path:
    return ctx.dir("world") / "data"


def _image_rows(data: Path) -> dict[Path, dict]:
    rows = [json.loads(line) for line in (data / "images.jsonl").read_text().splitlines()]
    return {(data / r["image"]).resolve(): r for r in rows}


def _reference_metrics(data: Path) -> dict:
    """Test-split metrics of the latent scores and of the pixel oracle, as if they were reward models."""
    from zr_diffusion.data import load_image, load_records
    from zr_diffusion.reward.evaluate import compute_metrics
    from zr_diffusion.synthetic.oracle import oracle_scores
    from zr_diffusion.synthetic.world import Scene

    records = load_records(data / "test.jsonl")
    rows = _image_rows(data)
    measured: dict[Path, dict] = {}
    for rec in records:
        if rec.image.resolve() not in measured:
            row = rows[rec.image.resolve()]
            measured[rec.image.resolve()] = oracle_scores(load_image(rec.image), Scene(**row["scene"]))
    latent = [rows[r.image.resolve()]["latent"][r.dimension] for r in records]
    pixel = [measured[r.image.resolve()][r.dimension] for r in records]
    out = {}
    for name, mu in (("latent", latent), ("pixel_oracle", pixel)):
        metrics = compute_metrics(
            records, mu, tokens_per_call=0.0, images_per_second=0.0, dimensions=DIMENSIONS
        )
        out[name] = metrics.to_json()["metrics"]
    return out


def run_world(ctx: Context, folder: Path) -> dict:
    from zr_diffusion.data import build_pairs, load_records
    from zr_diffusion.io import atomic_write_text
    from zr_diffusion.synthetic.dataset import build_reward_dataset

    world = ctx.cfg.world_config()
    ds = build_reward_dataset(world, folder / "data")
    counts, pairs, margin_pairs, annotations = {}, {}, {}, {}
    for split in SPLITS:
        records = load_records(getattr(ds, split))
        found = build_pairs(records)
        counts[split] = len(records)
        pairs[split] = len(found)
        margin_pairs[split] = sum(p.gap > 0.5 + 1e-9 for p in found)
        annotations[split] = len(records[0].scores) if records else 0
    rows = [json.loads(line) for line in ds.images.read_text().splitlines()]
    prompts = {s: sorted({r["prompt"] for r in rows if r["split"] == s}) for s in SPLITS}
    for split in ("train", "test"):
        atomic_write_text(folder / f"prompts_{split}.txt", "\n".join(prompts[split]) + "\n")
    reference = _reference_metrics(ds.root)
    defect_rate = {d: sum(r["latent"][d] < 5.0 for r in rows) / len(rows) for d in DIMENSIONS}
    return {
        "line": (
            f"{len(rows)} images of {world.num_prompts} prompts at {world.image_size} px; records "
            f"{counts['train']}/{counts['val']}/{counts['test']} (train/val/test), test pairs {pairs['test']} "
            f"({margin_pairs['test']} with a margin > 0.5); latent-score HPA on test "
            f"{reference['latent']['overall']['hpa']:.3f}"
        ),
        "data": str(ds.root),
        "images": len(rows),
        "prompts": {s: len(v) for s, v in prompts.items()},
        "records": counts,
        "pairs": pairs,
        "margin_pairs": margin_pairs,
        "annotations_per_record": annotations,
        "defect_rate": defect_rate,
        "reference": reference,
    }


def run_vlm(ctx: Context, folder: Path) -> dict:
    """The teacher and the student: built from config, then pretrained on perception (cached apart)."""
    from zr_diffusion.synthetic.stages import Step, run_steps

    cfg = ctx.cfg
    steps = []
    for k, (role, size, pretrain) in enumerate(
        (
            ("teacher", cfg.vlm.teacher_size, cfg.vlm.teacher_pretrain),
            ("student", cfg.vlm.student_size, cfg.vlm.student_pretrain),
        )
    ):
        key = {
            "role": role,
            "family": cfg.vlm.family,
            "size": size,
            "min_image_side": cfg.vlm.min_image_side,
            "pretrain": pretrain,
            "eval_images": cfg.vlm.perception_eval_images,
            "world": ctx.results["world"]["hash"],
            "seed": cfg.seed,
        }
        args = (role, size, pretrain, cfg.seed * 10 + k)
        steps.append(Step(f"vlm/{role}", lambda done, key=key, args=args: (key, _build, args)))
    # side by side when the demo has more than one torch thread (one process each)
    done = run_steps(ctx, steps, cfg.threads)
    out = {role: done[f"vlm/{role}"] for role in ("teacher", "student")}
    t, s = out["teacher"], out["student"]
    return {
        "line": (
            f"{cfg.vlm.family} teacher ({cfg.vlm.teacher_size}, {t['parameters']:,} params) and student "
            f"({cfg.vlm.student_size}, {s['parameters']:,}); held-out description loss "
            f"{t['val_loss_start']:.2f} -> {t['val_loss_end']:.2f} (teacher), "
            f"{s['val_loss_start']:.2f} -> {s['val_loss_end']:.2f} (student); colour named right "
            f"{t['perception']['colour_accuracy']:.0%} / {s['perception']['colour_accuracy']:.0%}"
        ),
        "family": cfg.vlm.family,
        **out,
    }


def set_min_image_side(model_dir: Path, side: int) -> None:
    """Raise the saved processor's pixel budget so that images are resized to at least ``side`` px
    (the real processors' ``min_pixels`` setting); the differentiable path reads the same budget."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    ip = processor.image_processor
    ip.size = {"shortest_edge": side * side, "longest_edge": max(int(ip.size["longest_edge"]), side * side)}
    processor.save_pretrained(model_dir)


def _build(ctx: Context, folder: Path, role: str, size: str, pretrain, seed: int) -> dict:
    from zr_diffusion.synthetic.pretrain import (
        perception_accuracy,
        pretrain_perception,
        render_items,
        split_scenes,
    )
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    cfg = ctx.cfg
    world = cfg.world_config()
    images = data_dir(ctx) / "images.jsonl"
    base = make_tiny_vlm(folder / "base", cfg.vlm.family, seed=seed, size=size)
    set_min_image_side(base, cfg.vlm.min_image_side)
    metrics = pretrain_perception(base, folder, world, images, pretrain, seed=seed, desc=f"pretrain {role}")
    items = render_items(split_scenes(images)["val"], world, cfg.vlm.perception_eval_images, stream=3)
    perception = perception_accuracy(folder / "model", items)
    return {
        "model": str(folder / "model"),
        "size": size,
        "parameters": metrics["parameters"],
        "val_loss_start": metrics["val_loss_start"],
        "val_loss_end": metrics["val_loss_end"],
        "pretrain_seconds": metrics["seconds"],
        "perception": perception,
    }
