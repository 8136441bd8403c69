"""A few scored records with PNG images and rationales, to run the reward recipes on tiny models.

``python -m zr_diffusion.reward.tiny_data runs/tiny/reward_data`` writes ``train.jsonl`` and
``eval.jsonl`` (images beside them). Scores follow a simple visible rule (brighter images score
higher) so that a few training steps can move HPA; the rationales feed the RewardDance baseline.
Several records share each prompt with different scores, so same-prompt pairs exist for HPA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from zr_diffusion.data import ScoredRecord, save_image, write_records
from zr_diffusion.scores import ScoreGrid

PROMPTS = ("a red circle above a blue square", "two green triangles next to a yellow star", "a small cat")


def write_tiny_records(
    out_dir: str | Path,
    *,
    per_prompt: int = 2,
    eval_per_prompt: int = 2,
    dimensions: tuple[str, ...] = ("alignment", "realism"),
    size: int = 64,
    seed: int = 0,
) -> tuple[Path, Path]:
    """Write ``train.jsonl`` and ``eval.jsonl`` (one image per record) into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    grid = ScoreGrid()
    splits: dict[str, list[ScoredRecord]] = {"train": [], "eval": []}
    for split, count in (("train", per_prompt), ("eval", eval_per_prompt)):
        for p, prompt in enumerate(PROMPTS):
            for dim in dimensions:
                for k in range(count):
                    brightness = (k + 1) / (count + 1)
                    image = (brightness + 0.1 * torch.randn(3, size, size, generator=g)).clamp(0, 1)
                    rid = f"{split}-{p}-{dim}-{k}"
                    path = out / "images" / f"{rid}.png"
                    save_image(image, path)
                    score = grid.nearest_bin(1.0 + 4.0 * brightness)
                    word = "bright" if brightness > 0.5 else "dark"
                    splits[split].append(
                        ScoredRecord(
                            id=rid,
                            prompt=prompt,
                            image=path.resolve(),
                            dimension=dim,
                            scores=(score,),
                            rationale=f"The image is {word} and the shapes look {'clean' if k else 'noisy'}.",
                        )
                    )
    write_records(splits["train"], out / "train.jsonl")
    write_records(splits["eval"], out / "eval.jsonl")
    return out / "train.jsonl", out / "eval.jsonl"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m zr_diffusion.reward.tiny_data OUT_DIR")
    train, evaluation = write_tiny_records(sys.argv[1])
    print(f"wrote {train} and {evaluation}")
