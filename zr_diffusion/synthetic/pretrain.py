"""Perception pretraining of the demo's base VLMs on the synthetic world (``zr demo``, stage ``vlm``).

A freshly built tiny VLM has random weights: it cannot see, and it cannot write. Real base VLMs can
do both before any reward training, so the demo first teaches its tiny ones to *describe* world
images: next-token cross-entropy on the renderer's ground-truth text (:func:`synthetic.describe`:
what the image shows and every defect it has), full fine-tuning including the vision tower.

The description is trained in the teacher template (``rubric.teacher_instruction``, a random rubric
dimension per example), followed by the score marker, so that the model's "reasoning" before the
marker is a perception of the image. The score token after the marker is never trained here: the
base models know nothing about scores, and the zero-shot baseline reads them as they are.

Images are rendered on the fly from the world's *training* prompts (fresh backgrounds, defects and
nuisance draws per image, from a seeded stream), so no test prompt is seen and the model cannot
memorise a fixed image set. Held-out images of the validation prompts give the reported loss.

Dimension names: B images in a batch, T suffix tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from zr_diffusion.io import atomic_write_json, write_dir_atomically
from zr_diffusion.rubric import DIMENSIONS, SCORE_MARKER
from zr_diffusion.synthetic.text import contents, describe, parse_contents
from zr_diffusion.synthetic.world import (
    BACKGROUNDS,
    COLORS,
    COUNTS,
    POSITIONS,
    SHAPES,
    Scene,
    WorldConfig,
    render_np,
    sample_defects,
)

_PRETRAIN_STREAM = 91_001  # random stream id of the pretraining renders (the world uses 0..4)
SHORT_INSTRUCTION = "Describe the image and every defect in it."


@dataclass
class PretrainConfig:
    """Perception pretraining of one VLM."""

    steps: int = 150  # optimizer steps
    batch_size: int = 16  # images per step (one rubric dimension's teacher prompt each)
    lr: float = 2e-3  # AdamW, cosine decay after warmup, full fine-tuning
    warmup_steps: int = 10
    weight_decay: float = 0.0
    num_images: int = 1024  # rendered training images (corpus prompts, fresh defects)
    corpus: str = "train"  # "train": the training prompts; "grammar": all but the held-out (corpus_scenes)
    val_images: int = 64  # rendered images of the validation prompts, for the held-out loss
    eval_every: int = 50  # held-out loss every this many steps (and at the start and the end)
    short_prompt_fraction: float = 0.0  # share of steps that use the short prompt instead of the teacher's
    vision_lr_scale: float = 1.0  # the vision tower's learning rate is lr x this
    contents_weight: float = 1.0  # CE weight of the first sentence's tokens (what the image shows)

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "num_images", "val_images", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"pretrain.{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.vision_lr_scale <= 0 or self.contents_weight <= 0:
            raise ValueError(
                "pretrain.lr, vision_lr_scale and contents_weight must be > 0, got "
                f"{self.lr}, {self.vision_lr_scale}, {self.contents_weight}"
            )
        if self.corpus not in CORPORA:
            raise ValueError(f"pretrain.corpus={self.corpus!r}: choose one of {list(CORPORA)}")
        if not 0 <= self.short_prompt_fraction <= 1:
            raise ValueError(
                f"pretrain.short_prompt_fraction must be in [0, 1], got {self.short_prompt_fraction}"
            )


@dataclass(frozen=True)
class PerceptionItem:
    image: np.ndarray  # [H, W, 3] in [0, 1]
    prompt: str
    description: str
    contents: str  # what the image shows, e.g. "two red triangles on the left on a dark background"


def render_items(
    scenes: Sequence[Scene], world: WorldConfig, count: int, stream: int
) -> list[PerceptionItem]:
    """``count`` renders of the given prompt scenes, each with freshly drawn background and defects."""
    rng = np.random.default_rng([world.seed, _PRETRAIN_STREAM, stream])
    items = []
    for k in range(count):
        scene = dataclasses.replace(scenes[k % len(scenes)], background=str(rng.choice(list(BACKGROUNDS))))
        defects = sample_defects(scene, world, rng)
        image = render_np(scene, defects, world.image_size, rng)
        items.append(PerceptionItem(image, scene.prompt, describe(scene, defects), contents(scene, defects)))
    return items


def split_scenes(images_jsonl: str | Path) -> dict[str, list[Scene]]:
    """The distinct prompt scenes of each split of a world dataset (from its ``images.jsonl``)."""
    out: dict[str, dict[str, Scene]] = {}
    for line in Path(images_jsonl).read_text().splitlines():
        row = json.loads(line)
        out.setdefault(row["split"], {}).setdefault(row["prompt"], Scene(**row["scene"]))
    return {split: list(scenes.values()) for split, scenes in out.items()}


CORPORA = ("train", "grammar")


def corpus_scenes(images_jsonl: str | Path, corpus: str) -> list[Scene]:
    """The prompt scenes a base model is pretrained on: ``"train"``, the dataset's training prompts; or
    ``"grammar"``, every prompt the world's grammar can write (shape x colour x position x count) except
    the dataset's held-out (val and test) prompts, which stay unseen. A base model pretrained on a broad
    corpus generalises to new combinations; one pretrained on 90 prompts memorises them."""
    scenes = split_scenes(images_jsonl)
    if corpus == "train":
        return scenes["train"]
    if corpus != "grammar":
        raise ValueError(f"corpus={corpus!r}: choose one of {list(CORPORA)}")
    held_out = {s.prompt for split in ("val", "test") for s in scenes.get(split, [])}
    grid = itertools.product(SHAPES, COLORS, POSITIONS, COUNTS)
    found = [Scene(shape=a, color=c, position=p, count=n) for a, c, p, n in grid]
    return [s for s in found if s.prompt not in held_out]


def suffix_ids(tokenizer, description: str) -> list[int]:
    """Token ids of ``description`` followed by the score marker as written before a score token
    ("… Score: 7" without the digit, the space included): what the model learns to write."""
    return tokenizer.encode(f"{description} {SCORE_MARKER} 1", add_special_tokens=False)[:-1]


def contents_token_count(tokenizer, description: str) -> int:
    """How many leading tokens of :func:`suffix_ids` spell the first sentence ("The image shows … .")."""
    first = description.split(". ", 1)[0] + "."
    ids = tokenizer.encode(first, add_special_tokens=False)
    if suffix_ids(tokenizer, description)[: len(ids)] != ids:
        raise ValueError(f"the first sentence of {description!r} does not tokenize as a prefix of the whole")
    return len(ids)


def _token_weights(
    tokenizer, items: Sequence[PerceptionItem], t: int, contents_weight: float
) -> torch.Tensor:
    """``[B, T]`` CE weights of right-aligned suffixes of width ``t``: ``contents_weight`` on the first
    sentence's tokens, 1 on the rest, 0 on padding."""
    weights = torch.zeros(len(items), t)
    for i, it in enumerate(items):
        n = len(suffix_ids(tokenizer, it.description))
        weights[i, t - n :] = 1.0
        weights[i, t - n : t - n + contents_token_count(tokenizer, it.description)] = contents_weight
    return weights


def _weighted_mean(token_logp: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean next-token CE: ``−Σ w·log π / Σ w`` (w = 0 on padding)."""
    return -(token_logp * weights).sum() / weights.sum()


def _batch_loss(
    scorer, items: Sequence[PerceptionItem], dims: Sequence[str], contents_weight: float = 1.0
) -> torch.Tensor:
    """Next-token CE over the description + marker tokens of every item (per token, the first
    sentence weighted ``contents_weight``), in the teacher template of each item's rubric dimension."""
    images = torch.from_numpy(np.stack([it.image.transpose(2, 0, 1) for it in items])).float()  # [B, 3, H, W]
    features = scorer.encode_images(images)
    suffixes = [suffix_ids(scorer.tokenizer, it.description) for it in items]
    read = scorer.suffix_readout(features, [it.prompt for it in items], list(dims), suffixes, mode="teacher")
    weights = _token_weights(scorer.tokenizer, items, read.token_mask.shape[1], contents_weight)  # [B, T]
    return _weighted_mean(read.token_logprobs, weights * read.token_mask.float())


def _short_prompt_ids(scorer, size: tuple[int, int]) -> list[int]:
    """Token ids of the short perception prompt (image + :data:`SHORT_INSTRUCTION`) for one image size."""
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": SHORT_INSTRUCTION}]}]
    text = scorer.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = scorer.processor(text=[text], images=[Image.new("RGB", (size[1], size[0]))])
    return [int(i) for i in enc["input_ids"][0]]


def _short_batch_loss(scorer, items: Sequence[PerceptionItem], contents_weight: float = 1.0) -> torch.Tensor:
    """The same CE after a short instruction instead of the ~220-token scoring prompt: the image is
    next to the text to write, and a step costs about a third."""
    from zr_diffusion.vlm.readout import ChatBatch

    images = torch.from_numpy(np.stack([it.image.transpose(2, 0, 1) for it in items])).float()  # [B, 3, H, W]
    features = scorer.encode_images(images)
    prompt = _short_prompt_ids(scorer, features.size)
    suffixes = [suffix_ids(scorer.tokenizer, it.description) for it in items]
    t = max(len(x) for x in suffixes)
    length = len(prompt) + t
    input_ids = torch.full((len(items), length), scorer.inputs.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(items), length), dtype=torch.long)
    for i, suffix in enumerate(suffixes):
        row = prompt + suffix
        input_ids[i, length - len(row) :] = torch.tensor(row)
        attention[i, length - len(row) :] = 1
    lengths = torch.tensor([len(x) for x in suffixes])
    batch = ChatBatch(input_ids, attention, lengths)
    logits = scorer.forward_logits(features, batch, logits_to_keep=t + 1).float()  # [B, T+1, V]
    logp = torch.log_softmax(logits[:, :t], dim=-1)
    targets = input_ids[:, length - t :]  # [B, T], right-aligned suffixes
    token_logp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
    return _weighted_mean(token_logp, _token_weights(scorer.tokenizer, items, t, contents_weight))


@torch.no_grad()
def _held_out_loss(scorer, items: Sequence[PerceptionItem], batch_size: int) -> float:
    dims = list(DIMENSIONS)
    total, n = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        loss = _batch_loss(scorer, chunk, [dims[(start + k) % len(dims)] for k in range(len(chunk))])
        total, n = total + float(loss) * len(chunk), n + len(chunk)
    return total / n


def pretrain_perception(
    model_dir: str | Path,
    out_dir: str | Path,
    world: WorldConfig,
    images_jsonl: str | Path,
    cfg: PretrainConfig,
    seed: int = 0,
    desc: str = "pretrain",
) -> dict:
    """Pretrain the VLM at ``model_dir`` to describe world images; save it to ``out_dir/model``.

    Writes ``out_dir/metrics.json`` (loss per step, held-out loss) and returns it.
    """
    from tqdm.auto import tqdm

    from zr_diffusion.vlm.loading import load_vlm
    from zr_diffusion.vlm.readout import VLMScorer

    out = Path(out_dir)
    scenes = split_scenes(images_jsonl)
    train_items = render_items(corpus_scenes(images_jsonl, cfg.corpus), world, cfg.num_images, stream=0)
    val_items = render_items(scenes["val"], world, cfg.val_images, stream=1)
    model, processor = load_vlm(model_dir)
    model.requires_grad_(True)
    scorer = VLMScorer(model, processor)
    params = [p for p in model.parameters() if p.requires_grad]
    vision = {id(p) for p in model.model.visual.parameters()}
    groups = [
        {"params": [p for p in params if id(p) not in vision], "lr": cfg.lr},
        {"params": [p for p in params if id(p) in vision], "lr": cfg.lr * cfg.vision_lr_scale},
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    gen = torch.Generator().manual_seed(seed)
    dims = list(DIMENSIONS)
    history: dict[str, list] = {"train": [], "eval": []}
    model.eval()
    history["eval"].append({"step": 0, "val_loss": _held_out_loss(scorer, val_items, cfg.batch_size)})
    tic = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, dynamic_ncols=True, leave=False)
    for step in bar:
        model.train()
        idx = torch.randint(len(train_items), (cfg.batch_size,), generator=gen).tolist()
        dim_idx = torch.randint(len(dims), (cfg.batch_size,), generator=gen).tolist()
        batch = [train_items[i] for i in idx]
        if float(torch.rand((), generator=gen)) < cfg.short_prompt_fraction:
            loss = _short_batch_loss(scorer, batch, cfg.contents_weight)
        else:
            loss = _batch_loss(scorer, batch, [dims[d] for d in dim_idx], cfg.contents_weight)
        if not torch.isfinite(loss.detach()):
            raise FloatingPointError(
                f"{desc}: step {step}: loss is {float(loss.detach())}; lower pretrain.lr"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        history["train"].append({"step": step + 1, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            history["eval"].append(
                {"step": step + 1, "val_loss": _held_out_loss(scorer, val_items, cfg.batch_size)}
            )
    model.eval()
    model.requires_grad_(False)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        write_dir_atomically(out / "model", write)
    finally:
        hf_logging.enable_progress_bar()
    metrics = {
        **history,
        "steps": cfg.steps,
        "seconds": time.perf_counter() - tic,
        "val_loss_start": history["eval"][0]["val_loss"],
        "val_loss_end": history["eval"][-1]["val_loss"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_images": len(train_items),
        "val_images": len(val_items),
        "model_dir": str(out / "model"),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


CONTENTS_PREFIX = "The image shows "
PERCEPTION_ATTRIBUTES = ("count", "colour", "shape", "position", "background")  # text.Contents fields


@torch.no_grad()
def perception_accuracy(model_dir: str | Path, items: Sequence[PerceptionItem], batch_size: int = 32) -> dict:
    """Greedy descriptions of ``items`` (teacher template, alignment prompt), read word by word.

    The first sentence "The image shows <count> <colour> <noun> <position> on a <bg> background." is
    compared with the renderer's truth: exact match of the whole contents, and the accuracy of each
    attribute of :data:`PERCEPTION_ATTRIBUTES` as read by :func:`text.parse_contents` (the noun in
    the singular; a part the sentence does not give counts as wrong). Also the mean number of
    generated tokens.
    """
    from zr_diffusion.vlm.loading import load_vlm
    from zr_diffusion.vlm.readout import VLMScorer
    from zr_diffusion.vlm.reasoning import generate_reasoning

    model, processor = load_vlm(model_dir)
    scorer = VLMScorer(model, processor)
    hits = dict.fromkeys(("contents", *PERCEPTION_ATTRIBUTES), 0)
    tokens = 0
    examples = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        images = torch.from_numpy(np.stack([it.image.transpose(2, 0, 1) for it in chunk])).float()
        samples = generate_reasoning(
            scorer, images, [it.prompt for it in chunk], "alignment", temperature=0.0, max_new_tokens=160
        )
        for it, (sample,) in zip(chunk, samples):
            text = sample.text.strip()
            first = text.split(".")[0].removeprefix(CONTENTS_PREFIX)
            hits["contents"] += first.split() == it.contents.split()
            said, truth = parse_contents(first), parse_contents(it.contents)
            for attr in PERCEPTION_ATTRIBUTES:
                hits[attr] += getattr(said, attr) is not None and getattr(said, attr) == getattr(truth, attr)
            tokens += sample.num_generated_tokens
            if len(examples) < 3:
                examples.append({"prompt": it.prompt, "truth": it.description, "generated": text})
    n = len(items)
    return {f"{k}_accuracy": v / n for k, v in hits.items()} | {
        "tokens_per_description": tokens / n,
        "images": n,
        "examples": examples,
    }


__all__ = [
    "PERCEPTION_ATTRIBUTES",
    "PerceptionItem",
    "PretrainConfig",
    "perception_accuracy",
    "pretrain_perception",
    "render_items",
    "split_scenes",
    "suffix_ids",
]
