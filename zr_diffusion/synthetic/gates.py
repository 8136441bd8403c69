"""Preconditions of ``zr demo``, measured on the shared base models and never on a method's result.

The generator gate: the base generator must draw the prompted objects. It generates every held-out
prompt of a split (seed-major, one image per (prompt, seed), fixed noise), the analytic oracle scores
each image given the prompt's scene (:func:`synthetic.oracle_scores`), and the same oracle scores the
world's renders of the same prompts (the dataset's own images, with the world's defects). The gate
passes when

    alignment mean of the generated images  >= min_alignment
    aggregate(generated) / aggregate(renders) >= min_aggregate_ratio

with both thresholds fixed in the config before any run (issue 12: 3.0 and 0.8).

Dimension names: N items, D rubric dimensions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from zr_diffusion.synthetic.oracle import oracle_scores
from zr_diffusion.synthetic.oracle_gsb import Variant, generate_variant, mean_by_dimension, oracle_table
from zr_diffusion.synthetic.world import Scene

GATE_SPLITS = ("val", "test")


@dataclass
class GeneratorGate:
    """How the base generator is sampled for its gate, and the pass thresholds (fixed, not tuned)."""

    split: str = "test"  # held-out prompts: val or test
    seeds: tuple[int, ...] = (0, 1)  # one image per (prompt, seed)
    num_steps: int = 20  # DDIM steps, as GSB samples
    guidance_scale: float = 3.0
    batch_size: int = 32
    min_alignment: float = 3.0  # oracle alignment mean of the generated images, in [1, 5]
    min_aggregate_ratio: float = 0.8  # oracle aggregate of generated / of the world's renders

    def __post_init__(self) -> None:
        self.seeds = tuple(self.seeds)
        if self.split not in GATE_SPLITS:
            raise ValueError(f"generator.gate.split={self.split!r}: choose one of {list(GATE_SPLITS)}")
        if not self.seeds:
            raise ValueError("generator.gate.seeds: give at least one seed")
        if min(self.num_steps, self.batch_size) < 1:
            raise ValueError("generator.gate: num_steps and batch_size must be >= 1")
        if not 1 <= self.min_alignment <= 5 or self.min_aggregate_ratio <= 0:
            raise ValueError(
                f"generator.gate: min_alignment must be in [1, 5] and min_aggregate_ratio > 0, got "
                f"{self.min_alignment} and {self.min_aggregate_ratio}"
            )


@dataclass
class VLMGate:
    """Perception gates of the base VLMs (issue 12 §1: >= 90% teacher, >= 80% student, on each of
    count, colour, shape, position and background, named right on held-out renders). Fixed, not tuned."""

    teacher_min: float = 0.9
    student_min: float = 0.8

    def __post_init__(self) -> None:
        if not (0 <= self.teacher_min <= 1 and 0 <= self.student_min <= 1):
            raise ValueError(
                f"vlm.gate: teacher_min and student_min are accuracies in [0, 1], got "
                f"{self.teacher_min} and {self.student_min}"
            )

    def threshold(self, role: str) -> float:
        return {"teacher": self.teacher_min, "student": self.student_min}[role]


def perception_checks(perception: dict, threshold: float, attributes: tuple[str, ...]) -> dict[str, dict]:
    """One check per attribute: its accuracy (``<attr>_accuracy`` of ``pretrain.perception_accuracy``)
    against ``threshold``."""
    return {a: gate_check(perception[f"{a}_accuracy"], threshold) for a in attributes}


def split_rows(images_jsonl: str | Path, split: str) -> list[dict]:
    """The world dataset's image rows of one split (``images.jsonl``), in file order."""
    rows = [json.loads(line) for line in Path(images_jsonl).read_text().splitlines()]
    found = [r for r in rows if r["split"] == split]
    if not found:
        raise ValueError(f"{images_jsonl}: no image of split {split!r}")
    return found


def prompt_scenes(rows: list[dict]) -> dict[str, Scene]:
    """Each prompt of the image ``rows`` (:func:`split_rows`) and its scene (the first render's),
    sorted by prompt."""
    scenes: dict[str, Scene] = {}
    for r in rows:
        scenes.setdefault(r["prompt"], Scene(**r["scene"]))
    return dict(sorted(scenes.items()))


def render_scores(images_jsonl: str | Path, rows: list[dict]) -> list[dict[str, float]]:
    """The oracle's scores of the world's renders (their PNGs next to ``images.jsonl``)."""
    from zr_diffusion.data import load_image

    root = Path(images_jsonl).parent
    return [oracle_scores(load_image(root / r["image"]), Scene(**r["scene"])) for r in rows]


def gate_check(value: float, threshold: float) -> dict:
    return {"value": value, "threshold": threshold, "passed": bool(value >= threshold)}


def generator_gate(pipeline: str | Path, images_jsonl: str | Path, gate: GeneratorGate, size: int) -> dict:
    """Sample the base ``pipeline`` on the gate's held-out prompts and compare the oracle's means with
    the renders' (module docstring). Returns the means, both checks and ``passed``."""
    from zr_diffusion.pipelines.sampler import SamplerConfig

    rows = split_rows(images_jsonl, gate.split)
    scenes = prompt_scenes(rows)
    prompts = list(scenes)
    sampler = SamplerConfig(
        num_steps=gate.num_steps, guidance_scale=gate.guidance_scale, height=size, width=size
    )
    images = generate_variant(Variant("base", str(pipeline)), prompts, gate.seeds, sampler, gate.batch_size)
    generated = mean_by_dimension(oracle_table(images, [scenes[p] for _ in gate.seeds for p in prompts]))
    renders = mean_by_dimension(render_scores(images_jsonl, rows))
    checks = {
        "alignment": gate_check(generated["alignment"], gate.min_alignment),
        "aggregate_ratio": gate_check(
            generated["aggregate"] / renders["aggregate"], gate.min_aggregate_ratio
        ),
    }
    return {
        "split": gate.split,
        "prompts": len(prompts),
        "seeds": list(gate.seeds),
        "images": len(images),
        "renders": len(rows),
        "generated": generated,
        "render_means": renders,
        "checks": checks,
        "passed": all(c["passed"] for c in checks.values()),
    }


__all__ = [
    "GATE_SPLITS",
    "GeneratorGate",
    "VLMGate",
    "gate_check",
    "generator_gate",
    "perception_checks",
    "prompt_scenes",
    "render_scores",
    "split_rows",
]
