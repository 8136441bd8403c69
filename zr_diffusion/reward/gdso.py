"""GDSO teacher recipe and the GRPO baseline (METHOD.md §2, §4; Algorithm 1, Eq. 3, 7–14).

Schedule (Algorithm 1) and how it maps to the config:

- N = ``gdso.iterations``; at the start of each iteration ``π_ref ← π_θ`` (:class:`ReferenceWeights`).
- M = ``gdso.steps_per_iteration`` rollout batches per iteration (null: ``run.max_steps / (N·K)``).
- K = ``gdso.updates_per_batch`` optimizer steps on each rollout batch (PPO clipping when K > 1).
- ``run.max_steps`` counts optimizer steps and must equal N·M·K. Optimizer step s is update
  ``k = s mod K`` of rollout batch ``r = s div K``, which belongs to iteration ``r div M``.
- A rollout batch holds ``batch_size`` pairs (global, over all processes); each of its K updates
  goes over all of them in ``run.grad_accum`` micro-batches. ``π_old ← π_θ`` before each batch:
  rollouts are sampled from the current weights.

Rewards come from the rollout-time distributions (π_old), advantages are normalised per side
(Eq. 3); the direct losses (Eq. 8, 11) are computed on the distributions of the update's forward
pass, so their gradients flow into q and μ directly. GRPO is the same recipe with α_pt = α_pw = 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from zr_diffusion.data.records import PreferencePair, build_pairs
from zr_diffusion.reward.losses import (
    PolicyLossOutput,
    combined_reward,
    group_advantages,
    pairwise_gap_loss,
    pairwise_reward,
    pointwise_ce_loss,
    pointwise_reward,
    policy_gradient_loss,
)
from zr_diffusion.reward.rollouts import (
    PairBatch,
    PolicyReadout,
    ReferenceWeights,
    RolloutBatch,
    encode_pair_images,
    pair_batch,
    policy_readout,
    sample_rollouts,
    vision_trainable,
)
from zr_diffusion.scores import ScoreGrid, expected_score, score_distribution
from zr_diffusion.training import ensure_finite

# --------------------------------------------------------------------------------------------------
# schedule


class Schedule(NamedTuple):
    """Algorithm 1: N iterations x M rollout batches x K updates = ``total`` optimizer steps."""

    iterations: int  # N
    steps_per_iteration: int  # M
    updates_per_batch: int  # K

    @property
    def total(self) -> int:
        return self.iterations * self.steps_per_iteration * self.updates_per_batch

    def position(self, step: int) -> tuple[int, int, int]:
        """Optimizer step (0-based) -> ``(iteration n, rollout batch m within it, update k)``."""
        if not 0 <= step < self.total:
            raise ValueError(f"step {step} is outside the schedule's {self.total} optimizer steps")
        batch, k = divmod(step, self.updates_per_batch)
        n, m = divmod(batch, self.steps_per_iteration)
        return n, m, k

    def rollout_index(self, step: int) -> int:
        """The rollout batch ``r`` that optimizer step ``step`` updates on (0-based, over the run)."""
        return step // self.updates_per_batch

    def starts_iteration(self, step: int) -> bool:
        _, m, k = self.position(step)
        return m == 0 and k == 0


def make_schedule(gdso, max_steps: int, save_every: int = 0) -> Schedule:
    """The schedule of a config; a ``run.max_steps`` that is not N·M·K is an error saying what to set.

    Checkpoints must fall on rollout-batch boundaries (``run.save_every`` a multiple of K): a rollout
    batch is not saved, and resampling it from later weights would not be the uninterrupted run.
    """
    n, k = gdso.iterations, gdso.updates_per_batch
    if gdso.steps_per_iteration is None:
        m, rest = divmod(max_steps, n * k)
        if rest or m < 1:
            raise ValueError(
                f"run.max_steps={max_steps} optimizer steps is not a multiple of gdso.iterations (N={n}) x "
                f"gdso.updates_per_batch (K={k}) = {n * k}; Algorithm 1 makes N x M x K steps: set "
                f"run.max_steps to a multiple of {n * k} or set gdso.steps_per_iteration (M)"
            )
    else:
        m = gdso.steps_per_iteration
        if n * m * k != max_steps:
            raise ValueError(
                f"run.max_steps={max_steps} must equal gdso.iterations (N={n}) x gdso.steps_per_iteration "
                f"(M={m}) x gdso.updates_per_batch (K={k}) = {n * m * k}; set run.max_steps={n * m * k} "
                f"or steps_per_iteration=null to derive M"
            )
    if save_every % k:
        raise ValueError(
            f"run.save_every={save_every} must be a multiple of gdso.updates_per_batch (K={k}) so that "
            f"checkpoints fall between rollout batches (0 saves only at the end)"
        )
    return Schedule(n, m, k)


# --------------------------------------------------------------------------------------------------
# rewards and advantages (Eq. 3, 7, 10, 13)


class GroupRewards(NamedTuple):
    """Rewards of every output of a rollout batch, and its advantage within its side's group."""

    mu: torch.Tensor  # [B, 2, G] the score the rewards are computed from
    pointwise: torch.Tensor  # [B, 2, G] Eq. 7
    pairwise: torch.Tensor  # [B, 2, G] Eq. 10
    reward: torch.Tensor  # [B, 2, G] Eq. 13
    advantages: torch.Tensor  # [B, 2, G] Eq. 3, normalised over the G outputs of one side


def reward_scores(rollout: RolloutBatch, grid: ScoreGrid, reward_from: str = "expectation") -> torch.Tensor:
    """The score each output is rewarded for ``[B, 2, G]``: ``μ = E_q[s]`` under π_old (the paper's
    choice), or with ``reward_from="parsed_text"`` the bin value of the sampled score token a (the
    score the output writes; the paper's Fig. 4 ablation)."""
    if reward_from == "expectation":
        probs = rollout.old_probs  # [B, 2, G, S]
        return expected_score(probs, grid.values(probs.device, probs.dtype))
    if reward_from == "parsed_text":
        return grid.values(rollout.score_index.device)[rollout.score_index]
    raise ValueError(f"gdso.reward_from must be 'expectation' or 'parsed_text', got {reward_from!r}")


def group_rewards(mu: torch.Tensor, scores: torch.Tensor, grid: ScoreGrid, gdso) -> GroupRewards:
    """Eq. 7, 10, 13 and 3 for the G outputs of both sides of B pairs.

    Args:
        mu: rewarded scores ``[B, 2, G]`` (side 0 = w, side 1 = l).
        scores: annotated ŝ_w, ŝ_l ``[B, 2]``.
        grid: the score grid (its range normalises the rewards).
        gdso: ``GDSOConfig`` (λ_pt, λ_pw, ε).
    """
    if mu.dim() != 3 or mu.shape[1] != 2 or scores.shape != mu.shape[:2]:
        raise ValueError(
            f"group_rewards: need mu [B,2,G] and scores [B,2], got {tuple(mu.shape)}, {tuple(scores.shape)}"
        )
    mu = mu.detach().float()
    scores = scores.to(mu)
    gap = scores[:, 0] - scores[:, 1]  # [B] Δŝ_{w,l}
    r_pt = pointwise_reward(mu, scores, grid.s_min, grid.s_max)  # [B, 2, G]
    r_pw = torch.stack(
        [
            pairwise_reward(mu[:, 0], mu[:, 1], gap, grid.s_min, grid.s_max),  # j = w
            pairwise_reward(mu[:, 1], mu[:, 0], -gap, grid.s_min, grid.s_max),  # j = l
        ],
        dim=1,
    )  # [B, 2, G]
    r = combined_reward(r_pt, r_pw, gdso.lambda_pt, gdso.lambda_pw)  # [B, 2, G]
    return GroupRewards(mu, r_pt, r_pw, r, group_advantages(r, gdso.eps))


# --------------------------------------------------------------------------------------------------
# the objective (Eq. 14)


class LossTerms(NamedTuple):
    """The GDSO objective and its parts (scalars)."""

    loss: torch.Tensor  # L_GRPO + α_pt L_CE + α_pw L_pw: what is back-propagated
    policy: PolicyLossOutput  # L_GRPO: clipped surrogate + β KL
    pointwise_ce: torch.Tensor  # L_CE (Eq. 8), reported even when α_pt = 0
    pairwise_gap: torch.Tensor  # L_pw (Eq. 11), reported even when α_pw = 0


def objective_weights(method: str, gdso) -> tuple[float, float]:
    """``(α_pt, α_pw)``: the config's for GDSO; GRPO has no direct losses, so both are 0 whatever the
    config says (the GRPO baseline of METHOD.md §4: same rollouts and rewards, no direct losses)."""
    if method == "gdso":
        return gdso.alpha_pt, gdso.alpha_pw
    if method == "grpo":
        return 0.0, 0.0
    raise ValueError(f"objective_weights: method must be 'gdso' or 'grpo', got {method!r}")


def gdso_loss(
    readout: PolicyReadout,
    rollout: RolloutBatch,
    advantages: torch.Tensor,
    grid: ScoreGrid,
    gdso,
    method: str = "gdso",
    step: int | str | None = None,
    check: bool = True,
    aggregate: str = "sum",
) -> LossTerms:
    """Eq. 14 on one rollout batch: ``L = L_GRPO(A) + α_pt L_CE + α_pw L_pw``.

    L_GRPO is :func:`policy_gradient_loss` over every sampled token (reasoning, the marker when the
    model wrote it, and the score token a), with the PPO clip against π_old only when the batch is
    used for K > 1 updates (with K = 1 the ratio is 1 and the gradient is ``−A ∇log π``), plus β·KL to
    π_ref. The direct losses use the score distributions of ``readout`` (this update's forward pass).
    A term whose weight is 0 is reported but not added, so a non-finite value there cannot poison the
    objective. With ``check`` every added term is checked for NaN/inf here (``training.ensure_finite``); the
    training loop passes ``check=False`` and checks the returned terms on every process at once
    before ``backward`` (a raise on one process alone would leave the others waiting).

    Args:
        readout: the current policy's log-probs ``[B, 2, G, T]`` and score logits ``[B, 2, G, S]``.
        rollout: the rollout batch (old/ref log-probs, masks, annotated scores).
        advantages: ``[B, 2, G]`` from :func:`group_rewards`.
        grid, gdso: the score grid and ``GDSOConfig``.
        method: "gdso" or "grpo" (see :func:`objective_weights`).
        step: where training is, for error messages.
        check: raise ``FloatingPointError`` on a non-finite added term.
        aggregate: token aggregation of L_GRPO (``policy_loss.aggregate``; ``sum`` is Eq. 4).
    """
    alpha_pt, alpha_pw = objective_weights(method, gdso)
    b, _, g, t = rollout.token_ids.shape
    n = b * 2 * g
    clip = gdso.clip_eps if gdso.updates_per_batch > 1 else None
    ref = rollout.ref_logprobs.reshape(n, t) if rollout.ref_logprobs is not None else None
    if gdso.beta > 0 and ref is None:
        raise ValueError("gdso.beta > 0 needs reference log-probs: sample the rollouts with a reference")
    device = readout.logprobs.device
    policy = policy_gradient_loss(
        readout.logprobs.reshape(n, t),
        rollout.old_logprobs.reshape(n, t).to(device),
        advantages.reshape(n).to(device),
        rollout.loss_mask.reshape(n, t).to(device),
        clip_eps=clip,
        ref_logprobs=ref.to(device) if ref is not None else None,
        beta=gdso.beta,
        aggregate=aggregate,
    )
    if check:
        ensure_finite(policy.loss, "policy_gradient", step)

    log_q = torch.log_softmax(readout.score_logits.float(), dim=-1)  # [B, 2, G, S]
    bins = rollout.pairs.score_bins.to(device)  # [B, 2]
    ce = pointwise_ce_loss(log_q[:, 0], log_q[:, 1], bins[:, 0], bins[:, 1])
    mu = expected_score(score_distribution(readout.score_logits), grid.values(device))  # [B, 2, G]
    gap = rollout.pairs.gap.to(device=device, dtype=mu.dtype)  # [B]
    pw = pairwise_gap_loss(mu[:, 0], mu[:, 1], gap, grid.s_min, grid.s_max)

    loss = policy.loss
    for name, weight, term in (("pointwise_ce", alpha_pt, ce), ("pairwise_gap", alpha_pw, pw)):
        if weight > 0:
            if check:
                ensure_finite(term, name, step)
            loss = loss + weight * term
    if check:
        ensure_finite(loss, "gdso_total", step)
    return LossTerms(loss, policy, ce.detach(), pw.detach())


def rollout_metrics(rollout: RolloutBatch, rewards: GroupRewards) -> dict[str, float]:
    """Scalars worth logging once per rollout batch."""
    return {
        "reward": float(rewards.reward.mean()),
        "reward_pointwise": float(rewards.pointwise.mean()),
        "reward_pairwise": float(rewards.pairwise.mean()),
        "reward_std": float(rewards.reward.std(dim=-1).mean()) if rewards.reward.shape[-1] > 1 else 0.0,
        "mu_gap": float((rewards.mu[:, 0] - rewards.mu[:, 1]).mean()),
        "tokens_per_output": float(rollout.num_sampled_tokens().float().mean()),
        "marker_appended": float(rollout.marker_appended.float().mean()),
    }


# --------------------------------------------------------------------------------------------------
# the recipe


def check_image_sizes(pairs: Sequence[PreferencePair], image_size: tuple[int, int] | None, data: str) -> None:
    """Training batches are one image tensor: without ``gdso.image_size`` every image must share one
    size. Read from the file headers at start-up, so a mixed set fails before any model is loaded."""
    if image_size is not None:
        return
    from PIL import Image

    sizes: dict[tuple[int, int], Path] = {}
    for path in dict.fromkeys(r.image for p in pairs for r in (p.w, p.l)):
        with Image.open(path) as im:
            width, height = im.size
        sizes.setdefault((height, width), path)
    if len(sizes) > 1:
        shown = ", ".join(f"{h}x{w} (e.g. {p})" for (h, w), p in list(sizes.items())[:4])
        raise ValueError(
            f"data.train: the images of {data} have {len(sizes)} sizes (H x W): {shown}; a GDSO batch is one "
            f"image tensor: set gdso.image_size=[H, W] to resize every training image to one size"
        )


def load_pairs(cfg) -> list[PreferencePair]:
    """Same-prompt, same-dimension pairs with different scores from ``data.train``; none is an error."""
    from zr_diffusion.reward.records import load_train_records

    records = load_train_records(cfg)
    pairs = build_pairs(records)
    if not pairs:
        raise ValueError(
            f"data.train: {cfg.data.train} has {len(records)} record(s) but no preference pair: GDSO/GRPO "
            f"need at least two records with the same prompt and dimension and different scores"
        )
    check_image_sizes(pairs, cfg.gdso.image_size, cfg.data.train)
    return pairs


class _Rollout(NamedTuple):
    """One micro-batch's rollouts, kept for the K updates of its rollout batch."""

    rollout: RolloutBatch
    rewards: GroupRewards
    features: object | None  # the images' vision features when the vision tower is frozen (reused)
    metrics: dict[str, float]


class GDSOStep:
    """The ``step_fn`` of :func:`~zr_diffusion.reward.loop.run_training` for GDSO / GRPO (one call per micro-batch).

    ``run_training`` makes one optimizer step per ``step`` over ``run.grad_accum`` micro-batches.
    This step function maps it onto Algorithm 1 (:class:`Schedule`): on the first update (k = 0) of
    rollout batch r it resets π_ref when r starts an iteration, then samples the micro-batch's
    rollouts from the current weights (π_old) and computes their rewards and advantages; the K
    updates of batch r reuse them. The pairs of batch r are the r-th batch of the seeded epoch walk
    (``training.batch_indices``), this process's shard, micro-batch by micro-batch, so the indices
    that ``run_training`` draws per optimizer step are not used. Rollout randomness is seeded from
    ``(seed, r, micro-batch, rank)``: a resumed run samples exactly what the uninterrupted one did.
    """

    def __init__(self, cfg, method: str, policy, pairs: Sequence[PreferencePair], accelerator, schedule):
        from zr_diffusion.reward.loop import check_batch_layout

        self.cfg, self.method, self.policy, self.pairs = cfg, method, policy, list(pairs)
        self.accelerator, self.schedule = accelerator, schedule
        self.grid = cfg.grid.build()
        self.per_micro = check_batch_layout(cfg.batch_size, accelerator.num_processes, cfg.run.grad_accum)
        # Rollouts and their old/ref readouts need no gradient: they run on the unwrapped model, so no
        # DDP collective runs outside the update's forward pass.
        self.rollout_scorer = policy.plain_scorer
        # π_ref's snapshot (checkpointed); never taken when β = 0, then its state is empty
        self.reference = ReferenceWeights(policy.model)
        self._cache: dict[int, _Rollout] = {}
        self._cache_batch = -1
        self._last_step, self._micro = -1, -1

    def _micro_index(self, step: int) -> int:
        self._micro = self._micro + 1 if step == self._last_step else 0
        self._last_step = step
        if self._micro >= self.cfg.run.grad_accum:
            raise RuntimeError(
                f"step {step}: more micro-batches than run.grad_accum={self.cfg.run.grad_accum}"
            )
        return self._micro

    def _pairs_of(self, r: int, micro: int) -> list[PreferencePair]:
        from zr_diffusion.training import batch_indices, shard

        local = shard(
            batch_indices(len(self.pairs), self.cfg.batch_size, self.cfg.run.seed, r), self.accelerator
        )
        return [self.pairs[i] for i in local[micro * self.per_micro : (micro + 1) * self.per_micro]]

    def _sample(self, r: int, micro: int) -> _Rollout:
        from zr_diffusion.training import seed_step, step_generator

        cfg, rank = self.cfg, self.accelerator.process_index
        pairs = pair_batch(self._pairs_of(r, micro), self.grid, cfg.gdso.image_size)
        pairs = pairs._replace(images=pairs.images.to(self.rollout_scorer.device))
        index = r * cfg.run.grad_accum + micro
        seed_step(cfg.run.seed + _ROLLOUT_SALT, index, rank)  # generate() samples from the global RNG
        generator = step_generator(cfg.run.seed + _ROLLOUT_SALT, index, rank)
        model = self.policy.model
        was_training = model.training
        model.eval()  # π_old without dropout
        try:
            with torch.no_grad():
                features = encode_pair_images(self.rollout_scorer, pairs)  # reused by the K updates if frozen
            rollout = sample_rollouts(
                self.rollout_scorer,
                pairs,
                group_size=cfg.gdso.group_size,
                max_new_tokens=cfg.rollout.max_new_tokens,
                temperature=cfg.rollout.temperature,
                top_p=cfg.rollout.top_p,
                top_k=cfg.rollout.top_k,
                generator=generator,
                reference=self.reference if cfg.gdso.beta > 0 else None,
                features=features,
            )
        finally:
            model.train(was_training)
        rewards = group_rewards(
            reward_scores(rollout, self.grid, cfg.gdso.reward_from), pairs.scores, self.grid, cfg.gdso
        )
        if vision_trainable(self.policy.vlm):
            features = None  # recomputed with gradient in each update
        return _Rollout(rollout, rewards, features, rollout_metrics(rollout, rewards))

    def __call__(self, step: int, batch: list[int]) -> dict[str, torch.Tensor]:
        micro = self._micro_index(step)
        n, m, k = self.schedule.position(step)
        r = self.schedule.rollout_index(step)
        if r != self._cache_batch:
            if k != 0:
                raise RuntimeError(
                    f"optimizer step {step} is update {k} of rollout batch {r}, whose rollouts are not in "
                    f"memory (resumed from a checkpoint inside a rollout batch?); resume from a checkpoint "
                    f"at a multiple of gdso.updates_per_batch={self.schedule.updates_per_batch}"
                )
            self._cache, self._cache_batch = {}, r
        if micro not in self._cache:
            if micro == 0 and self.schedule.starts_iteration(step) and self.cfg.gdso.beta > 0:
                self.reference.reset()  # π_ref ← π_θ at the start of iteration n
            self._cache[micro] = self._sample(r, micro)
        cached = self._cache[micro]
        readout = policy_readout(self.policy.scorer, cached.rollout, cached.features)
        terms = gdso_loss(
            readout,
            cached.rollout,
            cached.rewards.advantages,
            self.grid,
            self.cfg.gdso,
            self.method,
            step=f"{step} (iteration {n}, batch {m}, update {k})",
            check=False,
            aggregate=self.cfg.policy_loss.aggregate,
        )
        alpha_pt, alpha_pw = objective_weights(self.method, self.cfg.gdso)
        out = {
            "loss": terms.loss,
            "pg_loss": terms.policy.pg_loss.detach(),
            "kl": terms.policy.kl.detach(),
            "clip_fraction": terms.policy.clip_fraction,
        }
        for name, weight, value in (
            ("pointwise_ce", alpha_pt, terms.pointwise_ce),
            ("pairwise_gap", alpha_pw, terms.pairwise_gap),
        ):
            if weight > 0 or bool(torch.isfinite(value)):  # an unused non-finite term must not stop training
                out[name] = value
        device = terms.loss.device
        out.update({key: torch.tensor(v, device=device) for key, v in cached.metrics.items()})
        return out


_ROLLOUT_SALT = 7_919_000  # rollout seeds differ from the loop's per-step seeds


def _train(cfg, method: str):
    from zr_diffusion.reward.loop import run_training
    from zr_diffusion.reward.policy import setup_policy
    from zr_diffusion.reward.records import load_eval_records
    from zr_diffusion.reward.scoring import hpa_eval_fn
    from zr_diffusion.training import make_accelerator

    if cfg.method != method:
        raise ValueError(f"train_{method} got a config with method={cfg.method!r}; set method={method}")
    gdso = cfg.gdso
    schedule = make_schedule(gdso, cfg.run.max_steps, cfg.run.save_every)
    pairs = load_pairs(cfg)
    accelerator = make_accelerator(cfg.run)
    if method == "grpo" and (gdso.alpha_pt or gdso.alpha_pw):
        accelerator.print(
            f"grpo: no direct losses, gdso.alpha_pt={gdso.alpha_pt} and alpha_pw={gdso.alpha_pw} are not used"
        )
    accelerator.print(
        f"{method}: {len(pairs)} preference pairs; N={schedule.iterations} iterations x "
        f"M={schedule.steps_per_iteration} rollout batches x K={schedule.updates_per_batch} updates = "
        f"{schedule.total} optimizer steps; {cfg.batch_size} pairs x 2 sides x G={gdso.group_size} outputs per batch"
    )
    policy = setup_policy(cfg, accelerator)
    step_fn = GDSOStep(cfg, method, policy, pairs, accelerator, schedule)
    accelerator.register_for_checkpointing(step_fn.reference)  # before run_training resumes
    # teacher-mode HPA on data.eval: one sampled reasoning per record, q after the marker
    eval_fn = hpa_eval_fn(
        load_eval_records(cfg), cfg.data.dimensions, cfg.eval_batch_size, mode="teacher", rollout=cfg.rollout
    )
    return run_training(cfg, accelerator, policy, step_fn, eval_fn, num_examples=len(pairs))


def train_gdso(cfg):
    """``zr train-reward`` with ``method: gdso``: the Z-Reward teacher (Algorithm 1, Eq. 14)."""
    return _train(cfg, "gdso")


def train_grpo(cfg):
    """``zr train-reward`` with ``method: grpo``: the GRPO baseline of METHOD.md §4 — the same rollouts,
    rewards (Eq. 13 with the config's λ) and schedule as GDSO, no direct losses: α_pt = α_pw = 0
    whatever the config says (a note is printed when they are set)."""
    return _train(cfg, "grpo")


__all__ = [
    "GDSOStep",
    "GroupRewards",
    "LossTerms",
    "PairBatch",
    "Schedule",
    "gdso_loss",
    "group_rewards",
    "make_schedule",
    "objective_weights",
    "reward_scores",
    "rollout_metrics",
    "train_gdso",
    "train_grpo",
]
