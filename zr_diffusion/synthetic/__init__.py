"""The embedded synthetic world: prompts, controlled defects with latent true scores, a procedural
renderer, oracle annotators and an analytic pixel oracle, so the method runs on a CPU against a
known ground truth."""

from zr_diffusion.synthetic.annotators import (
    Annotator,
    annotate,
    annotate_image,
    annotate_scores,
    judge,
    judge_images,
    make_annotators,
)
from zr_diffusion.synthetic.dataset import WorldDataset, build_reward_dataset
from zr_diffusion.synthetic.oracle import measure, oracle_scores
from zr_diffusion.synthetic.text import describe, rationale
from zr_diffusion.synthetic.world import (
    DEFECT_KINDS,
    Defects,
    Scene,
    WorldConfig,
    latent_scores,
    render,
    sample_defects,
    sample_scene,
)

__all__ = [
    "DEFECT_KINDS",
    "Annotator",
    "Defects",
    "Scene",
    "WorldConfig",
    "WorldDataset",
    "annotate",
    "annotate_image",
    "annotate_scores",
    "build_reward_dataset",
    "describe",
    "judge",
    "judge_images",
    "latent_scores",
    "make_annotators",
    "measure",
    "oracle_scores",
    "rationale",
    "render",
    "sample_defects",
    "sample_scene",
]
