"""Scoring records with a VLM: grouping records by image, the student's answer logits, teacher
readouts of a given suffix, teacher rollouts and their mean distribution, and training-time HPA
(METHOD.md §3, §5).

Dimension names: B records in a batch, U distinct images, S score bins, V vocabulary, T tokens.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from zr_diffusion.data import ScoredRecord, load_image
from zr_diffusion.scores import expected_score, gather_score_logits, score_distribution
from zr_diffusion.vlm.readout import Mode, SuffixReadout, VLMScorer
from zr_diffusion.vlm.reasoning import is_sharded

if TYPE_CHECKING:
    pass


EvalFn = Callable[[VLMScorer, int], dict[str, float]]


# --------------------------------------------------------------------------------------------------
# scoring records


class ImageGroup(NamedTuple):
    """Records of one image size: the distinct images once, and which image each record shows."""

    positions: list[int]  # positions of these records in the caller's list
    images: torch.Tensor  # [U, 3, H, W] in [0, 1], each distinct image file once
    image_index: list[int]  # per record: which of the U images


def group_images(
    records: Sequence[ScoredRecord], device: torch.device | str | None = None
) -> list[ImageGroup]:
    """Load the records' images, grouped by size (one vision batch per size, each file loaded once)."""
    by_size: dict[tuple[int, int], tuple[list[int], list[Path], list[torch.Tensor], list[int]]] = {}
    loaded: dict[Path, torch.Tensor] = {}
    for pos, rec in enumerate(records):
        if rec.image not in loaded:
            loaded[rec.image] = load_image(rec.image)
        img = loaded[rec.image]
        positions, paths, tensors, index = by_size.setdefault(tuple(img.shape[-2:]), ([], [], [], []))
        if rec.image not in paths:
            paths.append(rec.image)
            tensors.append(img)
        positions.append(pos)
        index.append(paths.index(rec.image))
    return [
        ImageGroup(positions, torch.stack(tensors).to(device), index)
        for positions, _, tensors, index in by_size.values()
    ]


def _scorer_groups(scorer: VLMScorer, records: Sequence[ScoredRecord]) -> list[ImageGroup]:
    """:func:`group_images` on the scorer's device. A sharded model (FSDP2) runs one collective
    forward per image size, so every rank must see one size: more is an error, not a hang."""
    groups = group_images(records, scorer.device)
    if len(groups) > 1 and is_sharded(scorer.model):
        sizes = [tuple(g.images.shape[-2:]) for g in groups]
        raise ValueError(
            f"under FSDP every rank makes the same forward calls, one per image size, but this batch has "
            f"images of {len(groups)} sizes {sizes}; resize the data to one size (or train with DDP)"
        )
    return groups


def answer_logits(scorer: VLMScorer, records: Sequence[ScoredRecord], mode: Mode = "student") -> torch.Tensor:
    """Full-vocabulary logits at each record's answer position (right after its prompt): ``[B, V]``.

    Student mode: the score position. One vision pass per distinct image; one language-model pass
    per image size. Gradients flow to the trainable parameters.
    """
    out: list[torch.Tensor | None] = [None] * len(records)
    for group in _scorer_groups(scorer, records):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        batch = scorer.inputs.batch(
            [r.prompt for r in recs], [r.dimension for r in recs], features.size, mode, device=scorer.device
        )
        logits = scorer.forward_logits(features.select(group.image_index), batch, logits_to_keep=1)[:, -1]
        for k, p in enumerate(group.positions):
            out[p] = logits[k]
    return torch.stack(out)  # [B, V]


def student_score_logits(scorer: VLMScorer, records: Sequence[ScoredRecord]) -> torch.Tensor:
    """Score-token logits in student mode: ``[B, S]`` (``q = softmax`` of these)."""
    return gather_score_logits(answer_logits(scorer, records, "student"), scorer.token_ids)


def record_suffix_readout(
    scorer: VLMScorer,
    records: Sequence[ScoredRecord],
    suffixes: Sequence[Sequence[int]],
    mode: Mode,
) -> SuffixReadout:
    """:meth:`VLMScorer.suffix_readout` for records of any image sizes, in record order.

    ``token_logprobs`` / ``token_mask`` are ``[B, T]`` with suffixes right-aligned (groups with
    shorter suffixes are left-padded with masked zeros).
    """
    if len(suffixes) != len(records):
        raise ValueError(f"got {len(suffixes)} suffixes for {len(records)} records; give one per record")
    parts: list[tuple[list[int], SuffixReadout]] = []
    for group in _scorer_groups(scorer, records):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        readout = scorer.suffix_readout(
            features,
            [r.prompt for r in recs],
            [r.dimension for r in recs],
            [list(suffixes[p]) for p in group.positions],
            image_index=group.image_index,
            mode=mode,
        )
        parts.append((group.positions, readout))
    t = max(r.token_logprobs.shape[1] for _, r in parts)
    n, s = len(records), parts[0][1].score_logits.shape[-1]
    ref = parts[0][1].token_logprobs
    logprobs = ref.new_zeros(n, t)
    mask = torch.zeros(n, t, dtype=torch.bool, device=ref.device)
    score_logits = ref.new_zeros(n, s)
    score_logprobs = ref.new_zeros(n, s)
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    for positions, r in parts:
        idx = torch.as_tensor(positions, device=ref.device)
        width = r.token_logprobs.shape[1]
        logprobs = logprobs.index_put((idx,), torch.nn.functional.pad(r.token_logprobs, (t - width, 0)))
        mask = mask.index_put((idx,), torch.nn.functional.pad(r.token_mask, (t - width, 0)))
        score_logits = score_logits.index_put((idx,), r.score_logits.to(ref.dtype))
        score_logprobs = score_logprobs.index_put((idx,), r.score_logprobs.to(ref.dtype))
    return SuffixReadout(logprobs, mask, score_logits, score_logprobs)


def teacher_rollouts(
    scorer: VLMScorer, records: Sequence[ScoredRecord], rollout, num_samples: int = 1
) -> list:
    """``num_samples`` sampled reasonings per record, teacher template (``rollout``: a RolloutConfig):
    ``[B][R]`` ReasoningSamples, each with q read after its score marker. One vision pass per image."""
    from zr_diffusion.vlm.reasoning import generate_reasoning

    out: list = [None] * len(records)
    for group in _scorer_groups(scorer, records):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        samples = generate_reasoning(
            scorer,
            features.select(group.image_index),
            [r.prompt for r in recs],
            [r.dimension for r in recs],
            num_samples=num_samples,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            top_k=rollout.top_k,
            max_new_tokens=rollout.max_new_tokens,
        )  # [B][R]
        for p, outs in zip(group.positions, samples):
            out[p] = outs
    return out


def teacher_probs(
    scorer: VLMScorer, records: Sequence[ScoredRecord], rollout, num_samples: int = 1
) -> torch.Tensor:
    """Teacher-mode score distributions ``[B, S]``, averaged over ``num_samples`` reasonings per record."""
    samples = teacher_rollouts(scorer, records, rollout, num_samples)
    return torch.stack([torch.stack([s.probs.float() for s in outs]).mean(0) for outs in samples])  # [B, S]


# --------------------------------------------------------------------------------------------------
# evaluation during training


@torch.no_grad()
def eval_hpa(
    scorer: VLMScorer,
    records: Sequence[ScoredRecord],
    dims: Sequence[str],
    batch_size: int,
    mode: Mode = "student",
    rollout=None,
) -> dict[str, float]:
    """μ of every record (of a dimension in ``dims``), then HPA (Eq. 17) over the same-prompt,
    same-dimension pairs with different annotated scores.

    ``mode="student"``: q at the score position right after the prompt (one output token).
    ``mode="teacher"``: one sampled reasoning per record (``rollout``: a RolloutConfig), q after the
    score marker; the global RNG drives the sampling.

    Returns ``{"hpa": ..., "pairs": P, "records": N}``; ``hpa`` is left out when there is
    no such pair. Uses :func:`zr_diffusion.reward.evaluate.hpa` for the metric.
    """
    from zr_diffusion.data import build_pairs
    from zr_diffusion.reward.evaluate import MetricUndefined, hpa

    records = [r for r in records if r.dimension in set(dims)]
    grid_values = scorer.grid.values()
    mu: dict[str, float] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        if mode == "student":
            probs = score_distribution(student_score_logits(scorer, chunk)).float().cpu()  # [B, S]
        else:
            probs = teacher_probs(scorer, chunk, rollout, num_samples=1).float().cpu()  # [B, S]
        for rec, m in zip(chunk, expected_score(probs, grid_values).tolist()):
            mu[rec.id] = m
    pairs = build_pairs(records)
    out: dict[str, float] = {"pairs": float(len(pairs)), "records": float(len(records))}
    with contextlib.suppress(MetricUndefined):
        out["hpa"] = hpa(
            [mu[p.w.id] for p in pairs],
            [mu[p.l.id] for p in pairs],
            [p.w.score for p in pairs],
            [p.l.score for p in pairs],
        )
    return out


def hpa_eval_fn(
    records: Sequence[ScoredRecord],
    dims: Sequence[str],
    batch_size: int,
    mode: Mode = "student",
    rollout=None,
) -> EvalFn | None:
    """An ``eval_fn`` for :func:`run_training` computing :func:`eval_hpa` (None when no records)."""
    if not records:
        return None
    return lambda scorer, step: eval_hpa(scorer, records, dims, batch_size, mode, rollout)
