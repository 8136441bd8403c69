"""``zr demo`` stage ``indomain``: the base generator, its gate, and in-domain reward data.

Real reward data is generated images annotated by people (ARCHITECTURE.md: ``zr sample`` then
``zr annotate``). Steps (each cached on its own; the generator stage reuses ``base`` and ``gate``):

- ``indomain/base``     the tiny pipeline trained from scratch on world renders (:mod:`synthetic.generator`);
- ``indomain/gate``     its gate on held-out prompts (:mod:`synthetic.gates`);
- ``indomain/samples``  the base generator samples every training prompt ``train_per_prompt`` times and
                        every test prompt ``test_per_prompt`` times, noise seeds ``seed_start, seed_start
                        + 1, …``; the world's annotators score each image from the oracle's per-dimension
                        score (:func:`annotators.annotate_image`): one annotation per training image,
                        ``world.annotators_per_test_item`` per test image, as in the world's own data.

Annotators: the world's own pool (:func:`dataset.world_annotators`, the people who annotated the
renders). Their per-image draws come from the stream ``[seed, ANNOTATION_STREAM, split, prompt,
sample]``, apart from the dataset's streams (ids 0–4) and from the GSB raters', who are another pool
drawn with their own stream (``oracle_gsb._RATER_STREAM``).

Written to ``indomain/samples/data/``: ``images/{split}/p0003_s100.png``; ``train.jsonl`` and
``test.jsonl`` (the record format of ``world/data/train.jsonl``; rationales from the oracle's measured
defects); ``images.jsonl`` (per image: split, prompt, seed, scene, oracle scores); and
``train_merged.jsonl``, the world's training records followed by the generator's, which every reward
run trains on.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zr_diffusion.synthetic.world import DEFECT_KINDS, WorldConfig

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context

ANNOTATION_STREAM = 77_002  # the in-domain annotations' random stream (GSB raters: 77_001)
SAMPLE_SPLITS = ("train", "test")


@dataclass
class InDomainSettings:
    """Base-generator samples annotated as reward data (training prompts) and as a second test set."""

    train_per_prompt: int = 2  # images per training prompt, one annotation each
    test_per_prompt: int = 3  # images per test prompt, world.annotators_per_test_item annotations each
    seed_start: int = 100  # noise seeds seed_start, seed_start + 1, ... (GSB and the gate use 0..3)
    num_steps: int = 20  # DDIM steps, as GSB samples
    guidance_scale: float = 3.0
    batch_size: int = 32

    def __post_init__(self) -> None:
        if min(self.num_steps, self.batch_size) < 1 or self.seed_start < 0:
            raise ValueError("indomain: num_steps and batch_size must be >= 1 and seed_start >= 0")
        if self.train_per_prompt < 1 or self.test_per_prompt < 2:
            raise ValueError(
                f"indomain: train_per_prompt must be >= 1 and test_per_prompt >= 2 (same-prompt test "
                f"pairs), got {self.train_per_prompt} and {self.test_per_prompt}"
            )

    def seeds(self, split: str) -> tuple[int, ...]:
        n = self.train_per_prompt if split == "train" else self.test_per_prompt
        return tuple(range(self.seed_start, self.seed_start + n))


def annotation_rng(world_seed: int, split: str, prompt: int, sample: int) -> np.random.Generator:
    """The random stream of one generated image's annotations (module docstring)."""
    return np.random.default_rng([world_seed, ANNOTATION_STREAM, SAMPLE_SPLITS.index(split), prompt, sample])


def measured_rationale(severities: dict[str, float], dimension: str) -> str:
    """A post-hoc rationale of one dimension from the oracle's measured defect severities."""
    from zr_diffusion.rubric import get_dimension
    from zr_diffusion.synthetic.text import degree

    found = [f"{degree(severities[k])} {k} defect" for k in DEFECT_KINDS[dimension] if severities[k] > 0.05]
    return (
        f"For {get_dimension(dimension).title}: " + ("; ".join(found) if found else "no visible defect") + "."
    )


def annotate_samples(
    true_scores: list[dict[str, float]], world: WorldConfig, k: int, split: str, keys: list[tuple[int, int]]
) -> list[dict[str, tuple[float, ...]]]:
    """``k`` annotations per dimension of every image by the world's annotators, around its oracle
    scores ``true_scores`` ``[N]`` (:func:`oracle.oracle_scores`); ``keys`` ``[N]`` are the (prompt
    index, seed) of each image, which pick its annotation stream."""
    from zr_diffusion.scores import ScoreGrid
    from zr_diffusion.synthetic.annotators import annotate_scores
    from zr_diffusion.synthetic.dataset import world_annotators

    pool, grid = world_annotators(world), ScoreGrid()
    return [
        annotate_scores(t, pool, k, annotation_rng(world.seed, split, p, s), grid)
        for t, (p, s) in zip(true_scores, keys)
    ]


def _write_split(pipeline: str, world: WorldConfig, images_jsonl: Path, settings, split: str, root: Path):
    from zr_diffusion.data import ScoredRecord
    from zr_diffusion.pipelines.sampler import SamplerConfig
    from zr_diffusion.synthetic.dataset import save_png
    from zr_diffusion.synthetic.gates import prompt_scenes, split_rows
    from zr_diffusion.synthetic.oracle import measure, scores_from_severities
    from zr_diffusion.synthetic.oracle_gsb import Variant, generate_variant

    scenes = prompt_scenes(split_rows(images_jsonl, split))
    prompts, seeds = list(scenes), settings.seeds(split)
    size = world.image_size
    sampler = SamplerConfig(
        num_steps=settings.num_steps, guidance_scale=settings.guidance_scale, height=size, width=size
    )
    images = generate_variant(Variant("base", pipeline), prompts, seeds, sampler, settings.batch_size)
    keys = [(p, s) for s in seeds for p in range(len(prompts))]  # seed-major, as generate() orders them
    item_scenes = [scenes[prompts[p]] for p, _ in keys]
    severities = [measure(img, scene) for img, scene in zip(images, item_scenes)]
    oracle = [scores_from_severities(sev) for sev in severities]  # = oracle_scores, measured once
    k = 1 if split == "train" else world.annotators_per_test_item
    notes = annotate_samples(oracle, world, k, split, keys)
    records, rows = [], []
    for img, scene, (p, s), note, sev, true in zip(images, item_scenes, keys, notes, severities, oracle):
        rel = Path("images") / split / f"p{p:04d}_s{s}.png"
        save_png(img.permute(1, 2, 0).numpy(), root / rel)
        for dim in world.dimensions:
            records.append(
                ScoredRecord(
                    id=f"gen-{split}-p{p:04d}-s{s}-{dim}",
                    prompt=scene.prompt,
                    image=root / rel,
                    dimension=dim,
                    scores=note[dim],
                    rationale=measured_rationale(sev, dim),
                )
            )
        rows.append(
            {"split": split, "image": str(rel), "prompt": scene.prompt, "seed": s}
            | {"scene": dataclasses.asdict(scene), "oracle": true}
        )
    return records, rows


def write_samples(
    pipeline: str, world: WorldConfig, world_data: Path, settings: InDomainSettings, out: Path
) -> dict:
    """Sample, annotate and write the in-domain data under ``out`` (module docstring); returns a summary."""
    from zr_diffusion.data import build_pairs, load_records, write_records
    from zr_diffusion.io import atomic_write_text

    root = out.resolve()
    images_jsonl = world_data / "images.jsonl"
    summary: dict = {"data": str(root)}
    all_rows = []
    for split in SAMPLE_SPLITS:
        records, rows = _write_split(pipeline, world, images_jsonl, settings, split, root)
        write_records(records, root / f"{split}.jsonl")
        all_rows += rows
        summary[split] = str(root / f"{split}.jsonl")
        summary[f"{split}_images"] = len(rows)
        summary[f"{split}_records"] = len(records)
        summary[f"{split}_pairs"] = len(build_pairs(records))
    atomic_write_text(root / "images.jsonl", "".join(json.dumps(r) + "\n" for r in all_rows))
    merged = load_records(world_data / "train.jsonl") + load_records(root / "train.jsonl")
    write_records(merged, root / "train_merged.jsonl")
    summary["train_merged"] = str(root / "train_merged.jsonl")
    summary["train_merged_records"] = len(merged)
    summary["oracle_means"] = {
        split: {
            d: float(np.mean([r["oracle"][d] for r in all_rows if r["split"] == split]))
            for d in world.dimensions
        }
        for split in SAMPLE_SPLITS
    }
    return summary


def _base(ctx: Context, folder: Path) -> dict:
    from zr_diffusion.synthetic.generator import train_generator

    data = Path(ctx.results["world"]["data"])
    metrics = train_generator(
        folder, ctx.cfg.world_config(), data / "images.jsonl", ctx.cfg.generator.generator, seed=ctx.cfg.seed
    )
    return {
        "pipeline": metrics["pipeline"],
        "vae_recon_mse": metrics["vae_recon_mse"],
        "final_loss": float(np.mean([r["loss"] for r in metrics["train"][-20:]])),
        "train_images": metrics["train_images"],
        "denoiser_params": metrics["denoiser_params"],
        "train_seconds": metrics["seconds"],
        "cpu_seconds": metrics["cpu_seconds"],
        "threads": metrics["threads"],
        "train_metrics": str(folder / "metrics.json"),
    }


def _gate(ctx: Context, folder: Path, pipeline: str) -> dict:
    from zr_diffusion.io import atomic_write_json
    from zr_diffusion.synthetic.gates import generator_gate

    data = Path(ctx.results["world"]["data"])
    result = generator_gate(pipeline, data / "images.jsonl", ctx.cfg.generator.gate, ctx.cfg.world.image_size)
    atomic_write_json(folder / "gate.json", result)
    return result


def run_indomain(ctx: Context, folder: Path) -> dict:
    cfg = ctx.cfg
    world_hash = ctx.results["world"]["hash"]
    base = ctx.cache.run(
        "indomain/base",
        {"generator": cfg.generator.generator, "world": world_hash, "seed": cfg.seed},
        lambda d: _base(ctx, d),
    )
    gate = ctx.cache.run(
        "indomain/gate",
        {"gate": cfg.generator.gate, "base": base["hash"], "world": world_hash},
        lambda d: _gate(ctx, d, base["pipeline"]),
    )
    samples = ctx.cache.run(
        "indomain/samples",
        {"indomain": cfg.indomain, "base": base["hash"], "world": world_hash, "seed": cfg.seed},
        lambda d: write_samples(
            base["pipeline"], cfg.world_config(), Path(ctx.results["world"]["data"]), cfg.indomain, d / "data"
        ),
    )
    om = samples["oracle_means"]["train"]
    line = (
        f"base generator gate {'passed' if gate['passed'] else 'FAILED'}; {samples['train_images']} train and "
        f"{samples['test_images']} test generator samples annotated ({samples['test_pairs']} test pairs); "
        f"oracle alignment of the train samples {om['alignment']:.2f}"
    )
    return {"line": line, "base": base, "gate": gate, "samples": samples}


__all__ = [
    "ANNOTATION_STREAM",
    "InDomainSettings",
    "annotate_samples",
    "annotation_rng",
    "measured_rationale",
    "run_indomain",
    "write_samples",
]
