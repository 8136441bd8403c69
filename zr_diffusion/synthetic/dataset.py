"""Build the synthetic world's reward dataset: PNG images and train / val / test JSONL records.

Layout of ``out_dir`` (written into a temporary folder and moved into place whole)::

    images/{split}/p0003_i1.png     one render per (prompt, image)
    train.jsonl val.jsonl test.jsonl  records {id, prompt, image, dimension, score | scores, rationale}
    images.jsonl                    per image: split, prompt, scene, defects, latent scores, description
    world.json                      the WorldConfig and the file list

Prompts are split by prompt (no prompt is in two splits); every prompt has
``images_per_prompt`` renders with independently drawn defects, so same-prompt pairs exist. Train
records carry one annotation from one annotator (the same annotator for every dimension of an
image); val and test records carry ``annotators_per_test_item`` annotations. Every random draw comes
from its own stream keyed by (seed, purpose, prompt, image), so the world is a pure function of the
config and a different seed gives an independent world.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from zr_diffusion.data import ScoredRecord, write_records
from zr_diffusion.io import atomic_write_json, atomic_write_text, write_dir_atomically
from zr_diffusion.scores import ScoreGrid
from zr_diffusion.synthetic.annotators import Annotator, annotate_scores, make_annotators
from zr_diffusion.synthetic.shapes import SHAPES
from zr_diffusion.synthetic.text import describe, rationale
from zr_diffusion.synthetic.world import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    POSITIONS,
    Scene,
    WorldConfig,
    latent_scores,
    render_np,
    sample_defects,
    sample_scene,
)

SPLITS = ("train", "val", "test")
NUM_PROMPTS = len(SHAPES) * len(COLORS) * len(POSITIONS) * len(COUNTS)  # distinct prompts possible
_SCENES, _IMAGE, _ANNOTATORS, _ANNOTATE, _SPLIT = range(5)  # random stream ids


@dataclass(frozen=True)
class WorldDataset:
    root: Path
    train: Path
    val: Path
    test: Path
    images: Path  # images.jsonl: per-image ground truth and descriptions
    config: Path  # world.json


def _rng(cfg: WorldConfig, *key: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, *key])


def world_annotators(cfg: WorldConfig) -> list[Annotator]:
    """The world's annotator pool (the people who annotate its reward data; the GSB raters are
    another pool, see oracle_gsb)."""
    return make_annotators(cfg, _rng(cfg, _ANNOTATORS))


def sample_prompts(cfg: WorldConfig) -> list[Scene]:
    """``cfg.num_prompts`` scenes with distinct prompts (the background is drawn per image later)."""
    if cfg.num_prompts > NUM_PROMPTS:
        raise ValueError(
            f"num_prompts={cfg.num_prompts}: the grammar has only {NUM_PROMPTS} distinct prompts"
        )
    rng, scenes, seen = _rng(cfg, _SCENES), [], set()
    while len(scenes) < cfg.num_prompts:
        scene = sample_scene(rng)
        if scene.prompt not in seen:
            seen.add(scene.prompt)
            scenes.append(scene)
    return scenes


def split_prompts(cfg: WorldConfig) -> list[str]:
    """The split of each prompt index, with at least one prompt per split."""
    n = cfg.num_prompts
    n_test = max(1, round(cfg.test_fraction * n))
    n_val = max(1, round(cfg.val_fraction * n))
    if n_test + n_val >= n:
        raise ValueError(f"num_prompts={n} leaves no training prompts with val {n_val} and test {n_test}")
    order = _rng(cfg, _SPLIT).permutation(n)
    split = ["train"] * n
    for i in order[:n_test]:
        split[i] = "test"
    for i in order[n_test : n_test + n_val]:
        split[i] = "val"
    return split


def save_png(img: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).save(path, format="PNG")


def _write(cfg: WorldConfig, root: Path) -> None:
    root = root.resolve()
    grid = ScoreGrid()
    annotators = world_annotators(cfg)
    records: dict[str, list[ScoredRecord]] = {s: [] for s in SPLITS}
    rows = []
    for p, (prompt_scene, split) in enumerate(zip(sample_prompts(cfg), split_prompts(cfg))):
        for i in range(cfg.images_per_prompt):
            rng = _rng(cfg, _IMAGE, p, i)
            scene = dataclasses.replace(prompt_scene, background=str(rng.choice(list(BACKGROUNDS))))
            defects = sample_defects(scene, cfg, rng)
            rel = Path("images") / split / f"p{p:04d}_i{i}.png"
            save_png(render_np(scene, defects, cfg.image_size, rng), root / rel)
            latent = latent_scores(defects)
            k = 1 if split == "train" else cfg.annotators_per_test_item
            notes = annotate_scores(
                {d: latent[d] for d in cfg.dimensions}, annotators, k, _rng(cfg, _ANNOTATE, p, i), grid
            )
            for dim in cfg.dimensions:
                records[split].append(
                    ScoredRecord(
                        id=f"{split}-p{p:04d}-i{i}-{dim}",
                        prompt=scene.prompt,
                        image=root / rel,  # written relative to the JSONL's folder
                        dimension=dim,
                        scores=notes[dim],
                        rationale=rationale(scene, defects, dim),
                    )
                )
            rows.append(
                {
                    "id": f"p{p:04d}_i{i}",
                    "split": split,
                    "image": str(rel),
                    "prompt": scene.prompt,
                    "scene": dataclasses.asdict(scene),
                    "defects": dataclasses.asdict(defects),
                    "latent": latent,
                    "description": describe(scene, defects),
                }
            )
    for split in SPLITS:
        write_records(records[split], root / f"{split}.jsonl")
    atomic_write_text(root / "images.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(
        root / "world.json",
        {
            "format": "zr-synthetic-world/1",
            "config": dataclasses.asdict(cfg),
            "files": {s: f"{s}.jsonl" for s in SPLITS} | {"images": "images.jsonl"},
            "counts": {s: len(records[s]) for s in SPLITS},
        },
    )


def build_reward_dataset(cfg: WorldConfig, out_dir: str | Path) -> WorldDataset:
    """Render the world of ``cfg`` and write its annotated reward dataset to ``out_dir`` (replaced
    whole, atomically). Deterministic in ``cfg``."""
    root = Path(out_dir).resolve()
    write_dir_atomically(root, lambda tmp: _write(cfg, tmp))
    return WorldDataset(
        root=root,
        train=root / "train.jsonl",
        val=root / "val.jsonl",
        test=root / "test.jsonl",
        images=root / "images.jsonl",
        config=root / "world.json",
    )
