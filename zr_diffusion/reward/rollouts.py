"""GDSO / GRPO rollouts: G teacher outputs per side of each preference pair, sampled from π_old
(METHOD.md §2), and the frozen reference policy π_ref of Algorithm 1.

Dimension names: B preference pairs, 2 sides (0 = w, the higher-scored image; 1 = l), G outputs per
side, S score bins, T output tokens (reasoning, score marker and the score token, right-aligned).
Sequences are flattened as N = B x 2 x G in (pair, side, output) order.

An output is ``o = (ρ, a)``: reasoning ρ sampled by ``generate_reasoning`` up to the score marker
as a model writes it before the digit ("Score: " with its space, so q is read where the digit is
written), then one score token a. **(ours)** ``a`` is sampled from the score distribution there,
``a ~ softmax(score_logits / τ)`` over the S score tokens (τ = ``rollout.temperature``): the
policy's next-token distribution conditioned on writing a score token, so every output ends in a
valid score. Its log-probability in the policy-gradient loss is that of the full-vocabulary policy,
``log π(a | …) = logit_a − logsumexp(all logits)``, so the loss also raises (or lowers) the mass the
policy puts on score tokens at all. Token log-probs are the model's own (temperature 1, no top-p
filter), as in the GRPO paper and trl; the shipped configs sample at τ = 1 and top-p = 1, where the
rollout policy is exactly π_old (``generate`` gets a generation config built from the rollout
settings alone, nothing from the checkpoint's ``generation_config.json``: ``vlm.reasoning.sampling_config``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from zr_diffusion.data.records import PreferencePair, load_image
from zr_diffusion.reward.sharding import full_tensor, placed_like
from zr_diffusion.scores import ScoreGrid, score_distribution
from zr_diffusion.vlm.readout import VLMScorer
from zr_diffusion.vlm.reasoning import generate_reasoning

SIDES = 2  # w, l


class PairBatch(NamedTuple):
    """B preference pairs as tensors; side 0 is the higher-scored image ``w``, side 1 is ``l``."""

    images: torch.Tensor  # [B, 2, 3, H, W] in [0, 1]
    prompts: tuple[str, ...]  # [B]
    dimensions: tuple[str, ...]  # [B]
    scores: torch.Tensor  # [B, 2] annotated ŝ_w, ŝ_l
    score_bins: torch.Tensor  # [B, 2] bin index of ŝ_w, ŝ_l (long)

    @property
    def gap(self) -> torch.Tensor:
        """``Δŝ_{w,l} = ŝ_w − ŝ_l`` (Eq. 9) ``[B]``, > 0."""
        return self.scores[:, 0] - self.scores[:, 1]

    @property
    def num_pairs(self) -> int:
        return len(self.prompts)


def pair_batch(
    pairs: Sequence[PreferencePair], grid: ScoreGrid, image_size: tuple[int, int] | None = None
) -> PairBatch:
    """Load B pairs. All 2B images must share one size, or are resized to ``image_size = (H, W)``."""
    if not pairs:
        raise ValueError("pair_batch: got no preference pairs")
    images = [[load_image(p.w.image, image_size), load_image(p.l.image, image_size)] for p in pairs]
    first = tuple(images[0][0].shape[-2:])
    for pair, imgs in zip(pairs, images):
        for rec, img in zip((pair.w, pair.l), imgs):
            if tuple(img.shape[-2:]) != first:
                raise ValueError(
                    f"image {rec.image} is {tuple(img.shape[-2:])} (H, W) but {pairs[0].w.image} is {first}; "
                    f"a training batch shares one size: set gdso.image_size=[H, W] to resize all images"
                )
    scores = torch.tensor([[p.w.score, p.l.score] for p in pairs], dtype=torch.float32)  # [B, 2]
    bins = torch.tensor(
        [[grid.bin_index(p.w.score), grid.bin_index(p.l.score)] for p in pairs], dtype=torch.long
    )  # [B, 2]
    return PairBatch(
        images=torch.stack([torch.stack(imgs) for imgs in images]),  # [B, 2, 3, H, W]
        prompts=tuple(p.w.prompt for p in pairs),
        dimensions=tuple(p.w.dimension for p in pairs),
        scores=scores,
        score_bins=bins,
    )


class RolloutBatch(NamedTuple):
    """G outputs per side of B pairs sampled from π_old, with everything the K updates need.

    Token tensors are right-aligned: column T−1 holds the score token a; before it, each output's
    suffix (reasoning, then the score marker) ends at column T−2; columns before it are padding.
    """

    pairs: PairBatch
    suffix_ids: tuple[tuple[int, ...], ...]  # [N] reasoning + marker ids fed back for the readout
    token_ids: torch.Tensor  # [B, 2, G, T] suffix then score token, 0 on padding
    token_mask: torch.Tensor  # [B, 2, G, T] True on every real token (suffix and a)
    loss_mask: torch.Tensor  # [B, 2, G, T] True on tokens the policy sampled (not an appended marker)
    score_index: torch.Tensor  # [B, 2, G] bin index of the sampled score token a (long)
    old_logprobs: torch.Tensor  # [B, 2, G, T] log π_old of each token, 0 off token_mask
    ref_logprobs: torch.Tensor | None  # [B, 2, G, T] log π_ref, None when no reference was asked
    old_score_logits: torch.Tensor  # [B, 2, G, S] score-token logits after the marker under π_old
    marker_appended: torch.Tensor  # [B, 2, G] True where the marker was appended, not sampled

    @property
    def group_size(self) -> int:
        return self.token_ids.shape[2]

    @property
    def old_probs(self) -> torch.Tensor:
        """``q`` under π_old ``[B, 2, G, S]``."""
        return score_distribution(self.old_score_logits)

    def num_sampled_tokens(self) -> torch.Tensor:
        """Tokens each output sampled (reasoning, marker when generated, score token) ``[B, 2, G]``."""
        return self.loss_mask.sum(-1)


class PolicyReadout(NamedTuple):
    """One forward pass of a policy over the outputs of a rollout batch."""

    logprobs: torch.Tensor  # [B, 2, G, T] log π of each output token (0 off token_mask)
    score_logits: torch.Tensor  # [B, 2, G, S] score-token logits after the marker


class _SuffixRead(NamedTuple):
    token_logprobs: torch.Tensor  # [B, 2, G, T-1] log π of the suffix tokens, right-aligned
    score_logprobs: torch.Tensor  # [B, 2, G, S] full-vocabulary log π of each score token after the marker
    score_logits: torch.Tensor  # [B, 2, G, S]


def _flat_inputs(pairs: PairBatch, group_size: int) -> tuple[list[str], list[str], list[int]]:
    """Prompt, dimension and image (index into the 2B images, pair-major) of each of the N outputs."""
    b = pairs.num_pairs
    image_index = [i // group_size for i in range(b * SIDES * group_size)]  # image k: pair k // 2, side k % 2
    prompts = [pairs.prompts[k // SIDES] for k in image_index]
    dims = [pairs.dimensions[k // SIDES] for k in image_index]
    return prompts, dims, image_index


def vision_trainable(model: torch.nn.Module) -> bool:
    """Whether any parameter of the vision tower (``…visual…``) requires grad."""
    return any(p.requires_grad for n, p in model.named_parameters() if ".visual." in f".{n}")


def encode_pair_images(scorer: VLMScorer, pairs: PairBatch):
    """One vision pass over the 2B images (pair-major: pair 0 w, pair 0 l, pair 1 w, ...).

    Runs without gradient when no vision-tower parameter is trainable (the usual LoRA setting),
    so no vision activations are kept for the backward pass.
    """
    images = pairs.images.flatten(0, 1)  # [2B, 3, H, W]
    if torch.is_grad_enabled() and vision_trainable(scorer.model):
        return scorer.encode_images(images)
    with torch.no_grad():
        return scorer.encode_images(images)


def _read_suffixes(
    scorer: VLMScorer,
    pairs: PairBatch,
    suffix_ids: Sequence[Sequence[int]],
    group_size: int,
    t: int,
    features,
) -> _SuffixRead:
    """``suffix_readout`` over the N = B x 2 x G outputs, reshaped; token log-probs padded to T − 1."""
    b = pairs.num_pairs
    prompts, dims, image_index = _flat_inputs(pairs, group_size)
    out = scorer.suffix_readout(features, prompts, dims, [list(s) for s in suffix_ids], image_index)
    token_lp = F.pad(out.token_logprobs, (t - 1 - out.token_logprobs.shape[1], 0))  # [N, T-1]
    return _SuffixRead(
        token_logprobs=token_lp.view(b, SIDES, group_size, t - 1),
        score_logprobs=out.score_logprobs.view(b, SIDES, group_size, -1),
        score_logits=out.score_logits.view(b, SIDES, group_size, -1),
    )


def _with_score_token(read: _SuffixRead, score_index: torch.Tensor) -> torch.Tensor:
    """Append ``log π(a)`` to the suffix log-probs: ``[B, 2, G, T]``."""
    a = score_index.to(read.score_logprobs.device).unsqueeze(-1)  # [B, 2, G, 1]
    return torch.cat([read.token_logprobs, read.score_logprobs.gather(-1, a)], dim=-1)


def policy_readout(scorer: VLMScorer, rollout: RolloutBatch, features=None) -> PolicyReadout:
    """Per-token log-probs of every output (reasoning, marker, score token a) and the score logits at
    the marker, from one forward pass over ``prompt + reasoning + marker`` (``suffix_readout``).

    Gradients flow to the trainable parameters when grad is enabled; ``features`` (from
    :func:`encode_pair_images`) can be passed to reuse one vision pass.
    """
    g, t = rollout.token_ids.shape[2:]
    features = features if features is not None else encode_pair_images(scorer, rollout.pairs)
    read = _read_suffixes(scorer, rollout.pairs, rollout.suffix_ids, g, t, features)
    return PolicyReadout(_with_score_token(read, rollout.score_index), read.score_logits)


def sample_score_tokens(
    score_logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """``a ~ softmax(score_logits / τ)`` per output: ``[..., S] -> [...]`` bin indices (drawn on the CPU,
    so a seeded generator gives the same draws on every device)."""
    probs = score_distribution(score_logits.detach().float().cpu() / temperature)  # [..., S]
    flat = probs.reshape(-1, probs.shape[-1])  # [N, S]
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


@torch.no_grad()
def sample_rollouts(
    scorer: VLMScorer,
    pairs: PairBatch,
    *,
    group_size: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator,
    reference: ReferenceWeights | None = None,
    features=None,
    logits_processor=None,
) -> RolloutBatch:
    """Sample G outputs per side from the current policy (π_old) and read their old log-probs.

    Reasoning sampling uses the global RNG (seed it per step with ``training.seed_step``); the score
    token uses ``generator``. ``generate_reasoning`` returns q but not the per-token log-probs, so the
    outputs are read once more (no grad) for ``log π_old`` of every token (one teacher-forced pass,
    cheap next to sampling); with ``reference``, one more pass with the reference weights swapped in
    gives ``log π_ref``. ``features``: the pairs' vision features (:func:`encode_pair_images`), when
    the caller already has them. ``logits_processor`` goes to ``generate_reasoning`` (e.g. to force
    tokens in tests).
    """
    if group_size < 1:
        raise ValueError(f"group_size (G) must be >= 1, got {group_size}")
    b, g = pairs.num_pairs, group_size
    features = features if features is not None else encode_pair_images(scorer, pairs)
    samples = generate_reasoning(
        scorer,
        features,
        [p for p in pairs.prompts for _ in range(SIDES)],
        [d for d in pairs.dimensions for _ in range(SIDES)],
        num_samples=g,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        logits_processor=logits_processor,
    )  # [2B][G]
    outputs = [s for per_image in samples for s in per_image]  # N, (pair, side, output) order
    suffix_ids = tuple(tuple(s.token_ids) for s in outputs)
    n, t = len(outputs), max(len(s) for s in suffix_ids) + 1
    appended = torch.tensor([s.marker_appended for s in outputs])  # [N]

    token_ids = torch.zeros(n, t, dtype=torch.long)  # [N, T]
    token_mask = torch.zeros(n, t, dtype=torch.bool)  # [N, T]
    loss_mask = torch.zeros(n, t, dtype=torch.bool)  # [N, T]
    for k, (ids, out) in enumerate(zip(suffix_ids, outputs)):
        start = t - 1 - len(ids)
        token_ids[k, start : t - 1] = torch.tensor(ids, dtype=torch.long)
        token_mask[k, start:] = True
        loss_mask[k, start : start + out.sampled_length] = True  # an appended marker was not sampled
        loss_mask[k, t - 1] = True  # the score token a

    old = _read_suffixes(scorer, pairs, suffix_ids, g, t, features)
    score_index = sample_score_tokens(old.score_logits, temperature, generator)  # [B, 2, G]
    token_ids[:, -1] = torch.tensor(scorer.token_ids)[score_index.flatten()]
    ref_logprobs = None
    if reference is not None:
        with reference.swapped_in():
            ref = _read_suffixes(scorer, pairs, suffix_ids, g, t, features)
        ref_logprobs = _with_score_token(ref, score_index)
    return RolloutBatch(
        pairs=pairs,
        suffix_ids=suffix_ids,
        token_ids=token_ids.view(b, SIDES, g, t),
        token_mask=token_mask.view(b, SIDES, g, t),
        loss_mask=loss_mask.view(b, SIDES, g, t),
        score_index=score_index,
        old_logprobs=_with_score_token(old, score_index),
        ref_logprobs=ref_logprobs,
        old_score_logits=old.score_logits,
        marker_appended=appended.view(b, SIDES, g),
    )


class ReferenceWeights:
    """π_ref of Algorithm 1: the policy as it was at the start of the current iteration.

    Only the trainable parameters change during training, so the reference is a snapshot of those
    (the LoRA weights, or every weight under full fine-tuning) taken by :meth:`reset`; a reference
    pass swaps the snapshot in and the current weights back afterwards. (The frozen base model
    behind a disabled adapter is the reference only in the first iteration; this is right in every
    iteration.) The snapshot is part of the training state (``state_dict``), so a run resumed in the
    middle of an iteration keeps that iteration's reference. Works where each process holds its
    trainable parameters whole or as its own shards (DDP, FSDP2, ZeRO-1/2): under FSDP2 the snapshot
    and the swap are per shard, between forwards (when the units hold their shards); not under ZeRO-3.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.weights: dict[str, torch.Tensor] = {}

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def reset(self) -> None:
        """``π_ref ← π_θ``."""
        self.weights = {n: p.detach().clone() for n, p in self._params().items()}

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Within the block the model computes π_ref; the current weights are restored on exit."""
        if not self.weights:
            raise RuntimeError("the reference policy was never set; call reset() at the iteration start")
        params = self._params()
        if set(params) != set(self.weights):
            raise RuntimeError(
                f"trainable parameters changed since the reference was taken: {len(params)} now, "
                f"{len(self.weights)} in the reference"
            )
        with torch.no_grad():
            current = {n: p.detach().clone() for n, p in params.items()}
            for n, p in params.items():
                p.copy_(self.weights[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(current[n])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Whole tensors (under FSDP gathered from every rank's shard: call on every rank)."""
        return {n: full_tensor(w).cpu() for n, w in self.weights.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Whole tensors, each placed like its parameter (under FSDP: this rank's shard)."""
        params = self._params()
        missing = sorted(set(params) - set(state))
        if state and missing:
            raise ValueError(f"reference snapshot lacks trainable parameters {missing[:4]}")
        self.weights = {n: placed_like(state[n], params[n]) for n in state}
