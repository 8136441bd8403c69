"""Rewards, advantages and losses of Z-Reward, one pure function per paper equation (METHOD.md §2–4).

Dimension names: B batch (preference instances or samples), G outputs per side (group size),
S score bins, T tokens, N sequences in a flattened policy batch (e.g. B x 2 sides x G).

Recipes only weight and add the terms returned here; nothing in this file holds state.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = [
    "AGGREGATES",
    "PolicyLossOutput",
    "aggregate_tokens",
    "combined_reward",
    "group_advantages",
    "opd_advantages",
    "opd_loss",
    "pairwise_gap_loss",
    "pairwise_reward",
    "pointwise_ce_loss",
    "pointwise_reward",
    "policy_gradient_loss",
    "risd_loss",
]


# --------------------------------------------------------------------------------------------------
# boundary checks


def _fmt(shape: tuple[int, ...] | torch.Size) -> str:
    """``(2,3)``: compact shape for error messages."""
    dims = ",".join(str(d) for d in shape)
    return f"({dims},)" if len(shape) == 1 else f"({dims})"


def _shape(t: torch.Tensor) -> str:
    return _fmt(t.shape)


def _check_same_shape(fn: str, a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{fn}: {a_name}={_shape(a)} and {b_name} {_shape(b)} must have the same shape")


def _check_ndim(fn: str, t: torch.Tensor, name: str, ndim: int) -> None:
    if t.dim() != ndim:
        raise ValueError(f"{fn}: {name} must have {ndim} dims, got shape {_shape(t)}")


def _check_group(fn: str, t: torch.Tensor, name: str) -> int:
    """Last axis is the group axis G; returns G (must be >= 1)."""
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{fn}: {name} must have a group axis G >= 1 as its last dim, got shape {_shape(t)}")
    return t.shape[-1]


def _check_prefix(fn: str, t: torch.Tensor, t_name: str, prefix: torch.Tensor, p_name: str) -> None:
    """``prefix`` must be the shape of ``t`` without its last (group) axis."""
    if t.shape[:-1] != prefix.shape:
        raise ValueError(
            f"{fn}: {p_name} {_shape(prefix)} must match {t_name} {_shape(t)} without its last axis, "
            f"i.e. {_fmt(t.shape[:-1])}"
        )


def _check_range(fn: str, s_min: float, s_max: float) -> float:
    if not s_max > s_min:
        raise ValueError(f"{fn}: need s_max > s_min, got s_min={s_min}, s_max={s_max}")
    return float(s_max - s_min)


def _check_mask(fn: str, mask: torch.Tensor, like: torch.Tensor, like_name: str) -> torch.Tensor:
    """Validate a 0/1 token mask ``[N, T]``; returns it as bool. Every sequence needs a valid token."""
    _check_same_shape(fn, like, like_name, mask, "mask")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(
                f"{fn}: mask must hold only 0/1 (or be bool), got values {mask.unique().tolist()}"
            )
        mask = mask != 0
    empty = (~mask.any(dim=-1)).nonzero().flatten()
    if empty.numel() > 0:
        raise ValueError(
            f"{fn}: sequences {empty.tolist()} have no valid token in mask; every sequence needs >= 1 "
            "(drop empty rollouts before the loss)"
        )
    return mask


def _masked_seq_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's valid tokens, then mean over sequences. x, mask: [N, T] -> scalar."""
    per_seq = (x * mask).sum(dim=-1) / mask.sum(dim=-1)  # [N]
    return per_seq.mean()


AGGREGATES: tuple[str, ...] = ("sum", "sequence_mean", "token_mean")


def aggregate_tokens(x: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Token terms ``x [N, T]`` (0 off ``mask``) to one scalar, as ``policy_loss.aggregate`` says:

    - ``sum``: ``(1/N) Σ_n Σ_t x`` — Eq. 4 sums over an output's tokens (the paper's L_GRPO);
    - ``sequence_mean``: ``(1/N) Σ_n (1/|o_n|) Σ_t x`` (DeepSeekMath's GRPO);
    - ``token_mean``: ``Σ_n Σ_t x / Σ_n |o_n|``, one mean over every token of the batch (DAPO).
    """
    if how == "sum":
        return (x * mask).sum(dim=-1).mean()
    if how == "sequence_mean":
        return _masked_seq_mean(x, mask)
    if how == "token_mean":
        return (x * mask).sum() / mask.sum()
    raise ValueError(f"unknown token aggregation {how!r}; valid: {list(AGGREGATES)}")


# --------------------------------------------------------------------------------------------------
# GDSO rewards and advantages (Eq. 3, 7, 10, 13)


def pointwise_reward(mu: torch.Tensor, target: torch.Tensor, s_min: float, s_max: float) -> torch.Tensor:
    """Pointwise reward, Eq. 7: ``r_pt[i] = 1 − |μ_i − ŝ| / (s_max − s_min)``.

    Args:
        mu: expected scores ``[..., G]``.
        target: annotated score ŝ of the sample the group scored ``[...]``.
        s_min, s_max: ends of the score grid.

    Returns:
        ``[..., G]``, 1 for an exact score, 0 for the worst possible one.
    """
    fn = "pointwise_reward"
    _check_group(fn, mu, "mu [..., G]")
    _check_prefix(fn, mu, "mu [..., G]", target, "target [...]")
    rng = _check_range(fn, s_min, s_max)
    return 1.0 - (mu - target.unsqueeze(-1)).abs() / rng  # [..., G]


def pairwise_reward(
    mu_side: torch.Tensor, mu_other: torch.Tensor, gap: torch.Tensor, s_min: float, s_max: float
) -> torch.Tensor:
    """Pairwise reward, Eq. 10: ``r_pw[i] = 1 − (1/(G·range)) Σ_k |(μ_side,i − μ_other,k) − Δŝ|``.

    Each output of this side is compared with all G outputs of the other side.

    Args:
        mu_side: expected scores of side j ``[..., G]``.
        mu_other: expected scores of the other side j̄ ``[..., G]``.
        gap: annotated gap Δŝ_{j,j̄} = ŝ_j − ŝ_j̄ ``[...]`` (Eq. 9); negate it for the lower side.
        s_min, s_max: ends of the score grid.

    Returns:
        ``[..., G]`` rewards of side j.
    """
    fn = "pairwise_reward"
    g = _check_group(fn, mu_side, "mu_side [..., G]")
    _check_same_shape(fn, mu_side, "mu_side [..., G]", mu_other, "mu_other")
    _check_prefix(fn, mu_side, "mu_side [..., G]", gap, "gap [...]")
    rng = _check_range(fn, s_min, s_max)
    pred_gap = mu_side.unsqueeze(-1) - mu_other.unsqueeze(-2)  # [..., G, G]  (i, k)
    err = (pred_gap - gap[..., None, None]).abs()  # [..., G, G]
    return 1.0 - err.sum(dim=-1) / (g * rng)  # [..., G]


def combined_reward(
    r_pt: torch.Tensor, r_pw: torch.Tensor, lambda_pt: float, lambda_pw: float
) -> torch.Tensor:
    """Combined reward, Eq. 13: ``r = λ_pt · r_pt + λ_pw · r_pw``. Shapes ``[..., G]`` -> ``[..., G]``."""
    _check_same_shape("combined_reward", r_pt, "r_pt [..., G]", r_pw, "r_pw")
    return lambda_pt * r_pt + lambda_pw * r_pw


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6, unbiased: bool = True) -> torch.Tensor:
    """GRPO group-normalised advantage, Eq. 3: ``A_i = (r_i − mean_k r_k) / (std_k r_k + ε)``.

    Normalised over the last axis (the G outputs of one side). The paper does not fix the std
    estimator **(ours)**: the default ``unbiased=True`` is Bessel-corrected ``torch.std`` (divide by
    G − 1), as in DeepSeekMath's GRPO and trl; ``unbiased=False`` divides by G. Degenerate groups
    carry no learning signal and give exactly zero advantage instead of NaN: G = 1 (std undefined),
    and a group whose rewards are all equal (whose centred values can be ±ulp after rounding).
    The result is detached: advantages are constants of the policy-gradient loss.

    Args:
        rewards: ``[..., G]``.
        eps: added to the std; must be > 0.
        unbiased: std estimator, see above.

    Returns:
        ``[..., G]``.
    """
    fn = "group_advantages"
    g = _check_group(fn, rewards, "rewards [..., G]")
    if not eps > 0:
        raise ValueError(f"{fn}: eps must be > 0, got {eps}")
    rewards = rewards.detach()
    if g == 1:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=-1, keepdim=True)  # [..., G]
    std = rewards.std(dim=-1, keepdim=True, correction=1 if unbiased else 0)  # [..., 1]
    adv = centred / (std + eps)  # [..., G]
    all_equal = (rewards == rewards[..., :1]).all(dim=-1, keepdim=True)  # [..., 1]
    return torch.where(all_equal, torch.zeros_like(adv), adv)


# --------------------------------------------------------------------------------------------------
# GDSO direct losses (Eq. 8, 11)


def _check_bins(fn: str, bins: torch.Tensor, name: str, b: int, s: int) -> None:
    if bins.shape != (b,):
        raise ValueError(f"{fn}: {name} must have shape [B]=({b},), got {_shape(bins)}")
    if bins.dtype.is_floating_point or bins.dtype == torch.bool:
        raise ValueError(
            f"{fn}: {name} must hold score-bin indices (integer dtype), got {bins.dtype}; "
            "map scores to indices with ScoreGrid.bin_index"
        )
    bad = ((bins < 0) | (bins >= s)).nonzero().flatten()
    if bad.numel() > 0:
        raise ValueError(f"{fn}: {name} has indices {bins[bad].tolist()} outside [0, S={s})")


def pointwise_ce_loss(
    log_q_w: torch.Tensor, log_q_l: torch.Tensor, bin_w: torch.Tensor, bin_l: torch.Tensor
) -> torch.Tensor:
    """Pointwise cross-entropy, Eq. 8: ``L_CE = −(1/2G) Σ_{j∈{w,l}} Σ_i log q_{j,i}(ŝ_j)``, mean over B.

    Args:
        log_q_w, log_q_l: log score distributions (log-softmax over the S score bins) of the G
            outputs of each side ``[B, G, S]``.
        bin_w, bin_l: bin index of the annotated score of each side ``[B]`` (integer).

    Returns:
        scalar.
    """
    fn = "pointwise_ce_loss"
    _check_ndim(fn, log_q_w, "log_q_w [B,G,S]", 3)
    _check_same_shape(fn, log_q_w, "log_q_w [B,G,S]", log_q_l, "log_q_l")
    b, g, s = log_q_w.shape
    if g < 1 or s < 1:
        raise ValueError(f"{fn}: need G >= 1 and S >= 1, got log_q_w [B,G,S]={_shape(log_q_w)}")
    _check_bins(fn, bin_w, "bin_w", b, s)
    _check_bins(fn, bin_l, "bin_l", b, s)
    idx_w = bin_w.view(b, 1, 1).expand(b, g, 1)  # [B, G, 1]
    idx_l = bin_l.view(b, 1, 1).expand(b, g, 1)  # [B, G, 1]
    ll_w = log_q_w.gather(-1, idx_w).squeeze(-1)  # [B, G]
    ll_l = log_q_l.gather(-1, idx_l).squeeze(-1)  # [B, G]
    per_instance = -(ll_w.sum(dim=-1) + ll_l.sum(dim=-1)) / (2 * g)  # [B]
    return per_instance.mean()


def pairwise_gap_loss(
    mu_w: torch.Tensor, mu_l: torch.Tensor, gap_wl: torch.Tensor, s_min: float, s_max: float
) -> torch.Tensor:
    """Pairwise score-gap loss, Eq. 11, mean over B:

    ``L_pw = (1/(2 G² range)) Σ_{j∈{w,l}} Σ_i Σ_k |(μ_{j,i} − μ_{j̄,k}) − Δŝ_{j,j̄}|``, with
    ``Δŝ_{w,l} = gap_wl`` and ``Δŝ_{l,w} = −gap_wl``. The two directions hold the same G² terms,
    so this equals ``mean_{i,k} |μ_{w,i} − μ_{l,k} − gap_wl| / range``; both are written out to
    follow the paper.

    Args:
        mu_w, mu_l: expected scores of the G outputs of each side ``[B, G]``.
        gap_wl: annotated gap ŝ_w − ŝ_l ``[B]``.
        s_min, s_max: ends of the score grid.

    Returns:
        scalar.
    """
    fn = "pairwise_gap_loss"
    _check_ndim(fn, mu_w, "mu_w [B,G]", 2)
    g = _check_group(fn, mu_w, "mu_w [B,G]")
    _check_same_shape(fn, mu_w, "mu_w [B,G]", mu_l, "mu_l")
    _check_prefix(fn, mu_w, "mu_w [B,G]", gap_wl, "gap_wl [B]")
    rng = _check_range(fn, s_min, s_max)
    gap = gap_wl[:, None, None]  # [B, 1, 1]
    err_w = (mu_w.unsqueeze(-1) - mu_l.unsqueeze(-2) - gap).abs()  # [B, G, G]  j=w: (i over w, k over l)
    err_l = (mu_l.unsqueeze(-1) - mu_w.unsqueeze(-2) + gap).abs()  # [B, G, G]  j=l: (i over l, k over w)
    per_instance = (err_w.sum(dim=(-2, -1)) + err_l.sum(dim=(-2, -1))) / (2 * g * g * rng)  # [B]
    return per_instance.mean()


# --------------------------------------------------------------------------------------------------
# RISD student (Eq. 15)


def risd_loss(teacher_probs: torch.Tensor, student_logits: torch.Tensor, atol: float = 1e-3) -> torch.Tensor:
    """Reasoning-internalized score distillation, Eq. 15: ``E_B[ KL(q_T ‖ q_φ) ]`` over the score bins.

    ``KL = Σ_s q_T(s) (log q_T(s) − log_softmax(z)(s))`` with ``0 · log 0 = 0`` (a teacher zero
    contributes nothing, even where the student logit is −inf). Mean over the batch.

    Args:
        teacher_probs: teacher score distributions ``[B, S]``; each row must be >= 0 and sum to 1
            within ``atol`` (an error otherwise: logits or unnormalised targets are not fixed up).
        student_logits: student logits over the S score tokens ``[B, S]``.
        atol: tolerance on the row sums.

    Returns:
        scalar.
    """
    fn = "risd_loss"
    _check_ndim(fn, teacher_probs, "teacher_probs [B,S]", 2)
    _check_same_shape(fn, teacher_probs, "teacher_probs [B,S]", student_logits, "student_logits")
    if teacher_probs.shape[-1] < 1:
        raise ValueError(f"{fn}: need S >= 1 score bins, got teacher_probs {_shape(teacher_probs)}")
    with torch.no_grad():
        negative = (teacher_probs < 0).any(dim=-1).nonzero().flatten()
        if negative.numel() > 0:
            raise ValueError(f"{fn}: teacher_probs rows {negative.tolist()} have negative entries")
        sums = teacher_probs.sum(dim=-1)  # [B]
        off = ((sums - 1).abs() > atol).nonzero().flatten()
        if off.numel() > 0:
            raise ValueError(
                f"{fn}: teacher_probs rows must sum to 1 (atol={atol}); rows {off.tolist()[:8]} sum to "
                f"{sums[off].tolist()[:8]}; pass probabilities (softmax), not logits or counts"
            )
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits: softmax in fp32
    log_q_s = torch.log_softmax(student_logits.to(dtype), dim=-1)  # [B, S]
    p = teacher_probs.to(dtype)  # [B, S]
    terms = torch.xlogy(p, p) - torch.where(p > 0, p * log_q_s, torch.zeros_like(p))  # [B, S]
    return terms.sum(dim=-1).mean()


# --------------------------------------------------------------------------------------------------
# OPD baseline (Eq. 18, 19)


def opd_advantages(teacher_logprobs: torch.Tensor, old_logprobs: torch.Tensor) -> torch.Tensor:
    """On-policy distillation advantage, Eq. 18: ``A_t = log π_T(y_t|y_<t,x) − log π_old(y_t|y_<t,x)``.

    Stop-gradient: the result is detached. Shapes ``[B, T]`` -> ``[B, T]``.
    """
    _check_ndim("opd_advantages", teacher_logprobs, "teacher_logprobs [B,T]", 2)
    _check_same_shape(
        "opd_advantages", teacher_logprobs, "teacher_logprobs [B,T]", old_logprobs, "old_logprobs"
    )
    return (teacher_logprobs - old_logprobs).detach()  # [B, T]


def opd_loss(advantages: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation loss, Eq. 19: ``−(1/T) Σ_t A_t · log π_φ(y_t|y_<t,x)``, mean over B.

    T is each sequence's number of valid (mask = 1) tokens. ``advantages`` are treated as
    constants (detached); padded positions are ignored even if they hold inf/NaN.

    Args:
        advantages: per-token advantages from :func:`opd_advantages` ``[B, T]``.
        logprobs: student log-probs of the sampled tokens ``[B, T]``.
        mask: 1/True on valid tokens ``[B, T]``; every sequence needs at least one.

    Returns:
        scalar.
    """
    fn = "opd_loss"
    _check_ndim(fn, logprobs, "logprobs [B,T]", 2)
    _check_same_shape(fn, logprobs, "logprobs [B,T]", advantages, "advantages")
    mask = _check_mask(fn, mask, logprobs, "logprobs [B,T]")
    zero = torch.zeros_like(logprobs)
    adv = torch.where(mask, advantages.detach(), zero)  # [B, T]
    logp = torch.where(mask, logprobs, zero)  # [B, T]
    return _masked_seq_mean(-adv * logp, mask)


# --------------------------------------------------------------------------------------------------
# GRPO / GDSO policy-gradient term (Eq. 4)


class PolicyLossOutput(NamedTuple):
    """Result of :func:`policy_gradient_loss`; all scalars.

    loss: ``pg_loss + beta · kl`` (carries the gradient).
    pg_loss: the clipped surrogate term.
    kl: k3 estimate of KL(π_θ ‖ π_ref); 0 when no reference is given.
    clip_fraction: share of valid tokens whose gradient the clip removed (detached).
    """

    loss: torch.Tensor
    pg_loss: torch.Tensor
    kl: torch.Tensor
    clip_fraction: torch.Tensor


def policy_gradient_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float | None = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    beta: float = 0.0,
    aggregate: str = "sum",
) -> PolicyLossOutput:
    """Token-level GRPO loss, Eq. 4 (the L_GRPO term of Eq. 14).

    Per valid token t of sequence n, with ``ρ = exp(logp − old_logp)`` and sequence advantage A_n:
    ``ℓ_pg = −min(ρ A, clip(ρ, 1−ε, 1+ε) A)`` (``−ρ A`` when ``clip_eps`` is None) and
    ``ℓ_kl = exp(ref − logp) − (ref − logp) − 1`` (k3 estimator, unbiased and >= 0).
    Aggregation of the token terms (pg and KL alike) by :func:`aggregate_tokens`: ``sum`` over each
    output's tokens, then mean over outputs (Eq. 4, the default), ``sequence_mean`` or ``token_mean``.
    ``old_logprobs``, ``ref_logprobs`` and ``advantages`` are constants (detached), so with
    ``old_logprobs == logprobs.detach()`` the gradient is the REINFORCE gradient ``−A ∇logp``.

    Args:
        logprobs: current-policy log-probs of the sampled tokens ``[N, T]``.
        old_logprobs: rollout-policy log-probs ``[N, T]``.
        advantages: one advantage per sequence ``[N]`` (from :func:`group_advantages`, flattened).
        mask: 1/True on valid tokens ``[N, T]``; every sequence needs at least one.
        clip_eps: PPO clip ε in (0, 1), or None for no clipping.
        ref_logprobs: reference-policy log-probs ``[N, T]``; required when beta > 0.
        beta: KL weight, >= 0.
        aggregate: ``sum`` | ``sequence_mean`` | ``token_mean`` (``policy_loss.aggregate``).

    Returns:
        :class:`PolicyLossOutput`; ``clip_fraction`` is the mean over outputs of each output's clipped share,
        whatever ``aggregate``.
    """
    fn = "policy_gradient_loss"
    _check_ndim(fn, logprobs, "logprobs [N,T]", 2)
    _check_same_shape(fn, logprobs, "logprobs [N,T]", old_logprobs, "old_logprobs")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(
            f"{fn}: advantages must have shape [N]=({logprobs.shape[0]},) (one per sequence), "
            f"got {_shape(advantages)}"
        )
    mask = _check_mask(fn, mask, logprobs, "logprobs [N,T]")
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"{fn}: clip_eps must be in (0, 1) or None, got {clip_eps}")
    if beta < 0:
        raise ValueError(f"{fn}: beta must be >= 0, got {beta}")
    if beta > 0 and ref_logprobs is None:
        raise ValueError(f"{fn}: beta={beta} > 0 needs ref_logprobs [N,T]; pass them or set beta=0")
    if aggregate not in AGGREGATES:
        raise ValueError(f"{fn}: aggregate must be one of {list(AGGREGATES)}, got {aggregate!r}")

    # Zero padded positions first so inf/NaN padding cannot reach values or gradients.
    zero = torch.zeros_like(logprobs)
    logp = torch.where(mask, logprobs, zero)  # [N, T]
    old = torch.where(mask, old_logprobs.detach(), zero)  # [N, T]
    adv = advantages.detach().unsqueeze(-1)  # [N, 1]

    ratio = torch.exp(logp - old)  # [N, T]
    surr = ratio * adv  # [N, T]
    if clip_eps is None:
        pg_tok = -surr
        clipped = torch.zeros_like(mask)
    else:
        surr_clip = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * adv  # [N, T]
        pg_tok = -torch.minimum(surr, surr_clip)
        clipped = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))  # [N, T]
    pg_loss = aggregate_tokens(pg_tok, mask, aggregate)

    if ref_logprobs is None:
        kl = logprobs.new_zeros(())
    else:
        _check_same_shape(fn, logprobs, "logprobs [N,T]", ref_logprobs, "ref_logprobs")
        diff = torch.where(mask, ref_logprobs.detach(), zero) - logp  # [N, T]
        kl = aggregate_tokens(torch.exp(diff) - diff - 1.0, mask, aggregate)

    clip_fraction = _masked_seq_mean(clipped.to(logprobs.dtype), mask).detach()
    return PolicyLossOutput(loss=pg_loss + beta * kl, pg_loss=pg_loss, kl=kl, clip_fraction=clip_fraction)
