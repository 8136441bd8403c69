"""Hand-computed values and gradient flow for zr_diffusion.reward.losses (METHOD.md §2–4).

Every expected number is derived in the test's docstring. Grid: s_min = 1, s_max = 5, range = 4.
"""

from __future__ import annotations

import math

import pytest
import torch

from zr_diffusion.reward.losses import (
    PolicyLossOutput,
    combined_reward,
    group_advantages,
    opd_advantages,
    opd_loss,
    pairwise_gap_loss,
    pairwise_reward,
    pointwise_ce_loss,
    pointwise_reward,
    policy_gradient_loss,
    risd_loss,
)

S_MIN, S_MAX, RANGE = 1.0, 5.0, 4.0
F64 = torch.float64


def t(x, dtype=F64, **kw) -> torch.Tensor:
    return torch.tensor(x, dtype=dtype, **kw)


# ---------------------------------------------------------------------------------------- Eq. 7


def test_pointwise_reward_values():
    """mu = [1, 3, 5], ŝ = 3: |μ − ŝ| = [2, 0, 2] -> r = 1 − [2, 0, 2]/4 = [0.5, 1, 0.5]."""
    r = pointwise_reward(t([[1.0, 3.0, 5.0]]), t([3.0]), S_MIN, S_MAX)
    torch.testing.assert_close(r, t([[0.5, 1.0, 0.5]]))


def test_pointwise_reward_group_of_one():
    """G = 1, B = 2: |4.5 − 5| = 0.5 -> 1 − 0.5/4 = 0.875; |2 − 1| = 1 -> 1 − 1/4 = 0.75."""
    r = pointwise_reward(t([[4.5], [2.0]]), t([5.0, 1.0]), S_MIN, S_MAX)
    torch.testing.assert_close(r, t([[0.875], [0.75]]))


def test_pointwise_reward_shape_errors():
    with pytest.raises(ValueError, match=r"target \[\.\.\.\] \(3,\) must match mu"):
        pointwise_reward(torch.zeros(2, 4), torch.zeros(3), S_MIN, S_MAX)
    with pytest.raises(ValueError, match="s_max > s_min"):
        pointwise_reward(torch.zeros(2, 4), torch.zeros(2), 5.0, 1.0)
    with pytest.raises(ValueError, match="G >= 1"):
        pointwise_reward(torch.zeros(2, 0), torch.zeros(2), S_MIN, S_MAX)


# ---------------------------------------------------------------------------------------- Eq. 10


def test_pairwise_reward_values_both_sides():
    """G = 2, μ_w = [4.5, 3], μ_l = [2, 3], Δŝ_wl = 1, range 4, so r = 1 − Σ_k|.|/(2·4).

    side w (gap +1):
      i=0: |(4.5−2)−1| + |(4.5−3)−1| = 1.5 + 0.5 = 2 -> 1 − 2/8   = 0.75
      i=1: |(3−2)−1|   + |(3−3)−1|   = 0 + 1     = 1 -> 1 − 1/8   = 0.875
    side l (gap −1):
      i=0: |(2−4.5)+1| + |(2−3)+1|   = 1.5 + 0   = 1.5 -> 1 − 1.5/8 = 0.8125
      i=1: |(3−4.5)+1| + |(3−3)+1|   = 0.5 + 1   = 1.5 -> 0.8125
    """
    mu_w, mu_l, gap = t([[4.5, 3.0]]), t([[2.0, 3.0]]), t([1.0])
    torch.testing.assert_close(pairwise_reward(mu_w, mu_l, gap, S_MIN, S_MAX), t([[0.75, 0.875]]))
    torch.testing.assert_close(pairwise_reward(mu_l, mu_w, -gap, S_MIN, S_MAX), t([[0.8125, 0.8125]]))


def test_pairwise_reward_group_of_one():
    """G = 1: μ_side = 3, μ_other = 2, gap = 2: |(3−2)−2| = 1 -> 1 − 1/(1·4) = 0.75."""
    r = pairwise_reward(t([[3.0]]), t([[2.0]]), t([2.0]), S_MIN, S_MAX)
    torch.testing.assert_close(r, t([[0.75]]))


def test_pairwise_reward_shape_errors():
    with pytest.raises(ValueError, match=r"mu_side \[\.\.\., G\]=\(2,3\) and mu_other \(2,4\)"):
        pairwise_reward(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), S_MIN, S_MAX)
    with pytest.raises(ValueError, match=r"gap \[\.\.\.\] \(2,1\) must match"):
        pairwise_reward(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 1), S_MIN, S_MAX)


# ---------------------------------------------------------------------------------------- Eq. 13


def test_combined_reward_values():
    """λ_pt = 0.5, λ_pw = 2: [0.5·1 + 2·0.25, 0.5·0.5 + 2·0.75] = [1.0, 1.75]."""
    r = combined_reward(t([1.0, 0.5]), t([0.25, 0.75]), 0.5, 2.0)
    torch.testing.assert_close(r, t([1.0, 1.75]))
    with pytest.raises(ValueError, match="must have the same shape"):
        combined_reward(torch.zeros(2), torch.zeros(3), 1.0, 1.0)


# ---------------------------------------------------------------------------------------- Eq. 3


def test_group_advantages_unbiased_and_population():
    """r = [1, 2, 3, 4]: mean 2.5, centred [−1.5, −0.5, 0.5, 1.5], Σ centred² = 5.

    unbiased std = sqrt(5/3) = 1.2909944 -> A = centred / (1.2909944 + 1e-6)
    population std = sqrt(5/4) = 1.1180340 -> A = centred / (1.1180340 + 1e-6)
    """
    r = t([[1.0, 2.0, 3.0, 4.0]])
    centred = t([[-1.5, -0.5, 0.5, 1.5]])
    torch.testing.assert_close(group_advantages(r), centred / (math.sqrt(5 / 3) + 1e-6))
    torch.testing.assert_close(group_advantages(r, unbiased=False), centred / (math.sqrt(5 / 4) + 1e-6))


def test_group_advantages_degenerate_groups_are_zero():
    """G = 1 (std undefined) and all-equal groups give exact zeros, no NaN.

    Seven fp32 copies of 0.7 have mean 0.7 − 6e-8, so r − mean = 6e-8 ≠ 0 and std ≈ 0: the naive
    formula gives 6e-8 / (0 + 1e-6) ≈ 0.06; the guard gives 0. Row 1 all 7; row 2 = [0, 1, 2, 0, ...]
    is an ordinary group (finite, non-zero).
    """
    rows = torch.tensor([[0.7] * 7, [7.0] * 7, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0]])
    a = group_advantages(rows)
    assert torch.equal(a[:2], torch.zeros(2, 7))
    assert torch.isfinite(a[2]).all() and a[2].abs().sum() > 0
    for unbiased in (True, False):
        one = group_advantages(torch.tensor([[0.3], [0.9]]), unbiased=unbiased)
        assert torch.equal(one, torch.zeros(2, 1))


def test_group_advantages_detached():
    r = torch.tensor([[0.0, 1.0, 3.0]], requires_grad=True)
    assert not group_advantages(r).requires_grad


# ---------------------------------------------------------------------------------------- Eq. 8


def test_pointwise_ce_loss_values():
    """B = 2, G = 2, S = 3, L = −(1/2G) Σ_j Σ_i log q_{j,i}(ŝ_j), then mean over B.

    b=0: q_w = [[.5,.25,.25],[.25,.5,.25]], ŝ_w bin 0 -> log .5 + log .25 = −3 ln2;
         q_l = [[.25,.25,.5]] x 2, ŝ_l bin 2 -> 2 log .5 = −2 ln2;  L_0 = 5 ln2 / 4
    b=1: all q uniform 1/3 -> four terms log(1/3);                  L_1 = 4 ln3 / 4 = ln3
    L = (5 ln2 / 4 + ln3) / 2
    """
    q_w = t([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], [[1 / 3] * 3] * 2])
    q_l = t([[[0.25, 0.25, 0.5], [0.25, 0.25, 0.5]], [[1 / 3] * 3] * 2])
    loss = pointwise_ce_loss(q_w.log(), q_l.log(), torch.tensor([0, 1]), torch.tensor([2, 0]))
    torch.testing.assert_close(loss, t((5 * math.log(2) / 4 + math.log(3)) / 2))


def test_pointwise_ce_loss_group_of_one():
    """G = 1, S = 2: q_w = [.5, .5] bin 0, q_l = [.25, .75] bin 1 -> −(1/2)(ln .5 + ln .75) = ln(8/3)/2."""
    loss = pointwise_ce_loss(
        t([[[0.5, 0.5]]]).log(), t([[[0.25, 0.75]]]).log(), torch.tensor([0]), torch.tensor([1])
    )
    torch.testing.assert_close(loss, t(math.log(8 / 3) / 2))


def test_pointwise_ce_loss_gradient():
    """d/dz [−log softmax(z)_y] = softmax(z) − onehot(y); each of the B·2G terms is scaled by 1/(2G·B)."""
    torch.manual_seed(0)
    b, g, s = 2, 3, 9
    z_w = torch.randn(b, g, s, dtype=F64, requires_grad=True)
    z_l = torch.randn(b, g, s, dtype=F64, requires_grad=True)
    bin_w, bin_l = torch.tensor([8, 4]), torch.tensor([2, 0])
    pointwise_ce_loss(z_w.log_softmax(-1), z_l.log_softmax(-1), bin_w, bin_l).backward()
    for z, bins in ((z_w, bin_w), (z_l, bin_l)):
        onehot = torch.nn.functional.one_hot(bins, s).to(F64)[:, None, :].expand(b, g, s)
        torch.testing.assert_close(z.grad, (z.detach().softmax(-1) - onehot) / (2 * g * b))


def test_pointwise_ce_loss_errors():
    lq = torch.zeros(2, 3, 9)
    with pytest.raises(ValueError, match="integer dtype"):
        pointwise_ce_loss(lq, lq, torch.tensor([4.5, 3.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"indices \[9\] outside \[0, S=9\)"):
        pointwise_ce_loss(lq, lq, torch.tensor([0, 1]), torch.tensor([9, 1]))
    with pytest.raises(ValueError, match=r"log_q_w \[B,G,S\]=\(2,3,9\) and log_q_l \(2,4,9\)"):
        pointwise_ce_loss(lq, torch.zeros(2, 4, 9), torch.tensor([0, 1]), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------- Eq. 11


def test_pairwise_gap_loss_values():
    """G = 2, μ_w = [4.5, 3], μ_l = [2, 3], gap_wl = 1, range 4.

    j=w terms |(μ_w,i − μ_l,k) − 1|:  1.5, 0.5, 0, 1  -> 3
    j=l terms |(μ_l,i − μ_w,k) + 1|:  1.5, 0, 0.5, 1  -> 3
    L = (3 + 3) / (2 · 2² · 4) = 6/32 = 0.1875
    (= 1 − mean of the Eq. 10 rewards [0.75, 0.875, 0.8125, 0.8125] = 1 − 0.8125.)
    """
    mu_w, mu_l, gap = t([[4.5, 3.0]]), t([[2.0, 3.0]]), t([1.0])
    loss = pairwise_gap_loss(mu_w, mu_l, gap, S_MIN, S_MAX)
    torch.testing.assert_close(loss, t(0.1875))
    r = torch.cat(
        [pairwise_reward(mu_w, mu_l, gap, S_MIN, S_MAX), pairwise_reward(mu_l, mu_w, -gap, S_MIN, S_MAX)]
    )
    torch.testing.assert_close(loss, 1 - r.mean())


def test_pairwise_gap_loss_group_of_one_and_gradient():
    """G = 1, μ_w = μ_l = 3, gap 1: both terms |0 − 1| = 1 -> L = 2 / (2·1·4) = 0.25.

    Gradient: u = μ_w − μ_l − 1 = −1; L = (|u| + |−u|)/8 -> dL/dμ_w = 2·sign(u)/8 = −0.25, dL/dμ_l = +0.25.
    """
    mu_w = t([[3.0]], requires_grad=True)
    mu_l = t([[3.0]], requires_grad=True)
    loss = pairwise_gap_loss(mu_w, mu_l, t([1.0]), S_MIN, S_MAX)
    torch.testing.assert_close(loss, t(0.25))
    loss.backward()
    torch.testing.assert_close(mu_w.grad, t([[-0.25]]))
    torch.testing.assert_close(mu_l.grad, t([[0.25]]))


def test_pairwise_gap_loss_equals_mean_of_abs_terms_over_range():
    """Both directions hold the same G² terms, so L = mean_b mean_{i,k} |μ_w,i − μ_l,k − gap| / range."""
    torch.manual_seed(1)
    mu_w, mu_l = 1 + 4 * torch.rand(3, 5, dtype=F64), 1 + 4 * torch.rand(3, 5, dtype=F64)
    gap = t([0.5, 2.0, 1.5])
    expected = (mu_w[:, :, None] - mu_l[:, None, :] - gap[:, None, None]).abs().mean(
        dim=(1, 2)
    ).mean() / RANGE
    torch.testing.assert_close(pairwise_gap_loss(mu_w, mu_l, gap, S_MIN, S_MAX), expected)


def test_pairwise_gap_loss_shape_errors():
    with pytest.raises(
        ValueError, match=r"pairwise_gap_loss: mu_w \[B,G\]=\(2,3\) and mu_l \(2,4\) must have the same shape"
    ):
        pairwise_gap_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), S_MIN, S_MAX)
    with pytest.raises(ValueError, match=r"gap_wl \[B\] \(3,\) must match"):
        pairwise_gap_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), S_MIN, S_MAX)
    with pytest.raises(ValueError, match="must have 2 dims"):
        pairwise_gap_loss(torch.zeros(3), torch.zeros(3), torch.zeros(()), S_MIN, S_MAX)


# ---------------------------------------------------------------------------------------- Eq. 15


def test_risd_loss_values():
    """KL(p‖q) = Σ_s p log(p/q), mean over B = 2.

    b=0: p = [.5, .5, 0], q = [.25, .25, .5] -> 2 · .5 · ln 2 + 0 = ln 2
    b=1: p = [1, 0, 0],   q = softmax(0) = 1/3 -> ln 3
    L = (ln 2 + ln 3) / 2
    """
    p = t([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    z = torch.stack([t([0.25, 0.25, 0.5]).log(), t([0.0, 0.0, 0.0])])
    torch.testing.assert_close(risd_loss(p, z), t((math.log(2) + math.log(3)) / 2))


def test_risd_loss_zero_when_student_matches_teacher():
    torch.manual_seed(2)
    z = torch.randn(4, 9, dtype=F64)
    torch.testing.assert_close(risd_loss(z.softmax(-1), z), t(0.0), atol=1e-12, rtol=0)


def test_risd_loss_teacher_zeros_with_masked_student_logit():
    """p = [.5, .5, 0], z = [0, 0, −inf]: q = [.5, .5, 0]; 0·log 0 = 0 and 0·(−inf) is skipped -> KL = 0, grad finite."""
    z = t([[0.0, 0.0, -math.inf]], requires_grad=True)
    loss = risd_loss(t([[0.5, 0.5, 0.0]]), z)
    torch.testing.assert_close(loss, t(0.0))
    loss.backward()
    assert torch.isfinite(z.grad).all()


def test_risd_loss_gradient():
    """dKL/dz = softmax(z) − p, divided by B."""
    torch.manual_seed(3)
    p = torch.randn(3, 9, dtype=F64).softmax(-1)
    z = torch.randn(3, 9, dtype=F64, requires_grad=True)
    risd_loss(p, z).backward()
    torch.testing.assert_close(z.grad, (z.detach().softmax(-1) - p) / 3)


def test_risd_loss_validates_teacher():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"rows must sum to 1.*rows \[1\] sum to \[1\.2"):
        risd_loss(torch.tensor([[0.2, 0.3, 0.5], [0.4, 0.4, 0.4]]), z)
    with pytest.raises(ValueError, match="negative entries"):
        risd_loss(torch.tensor([[1.2, -0.2, 0.0], [0.2, 0.3, 0.5]]), z)
    with pytest.raises(ValueError, match=r"teacher_probs \[B,S\]=\(2,3\) and student_logits \(2,4\)"):
        risd_loss(torch.full((2, 3), 1 / 3), torch.zeros(2, 4))


# ---------------------------------------------------------------------------------------- Eq. 18, 19


def test_opd_advantages_values_and_stop_gradient():
    """A = log π_T − log π_old = [−1 − (−1.5), −2 − (−1)] = [0.5, −1]; detached."""
    teacher = t([[-1.0, -2.0]], requires_grad=True)
    old = t([[-1.5, -1.0]], requires_grad=True)
    a = opd_advantages(teacher, old)
    torch.testing.assert_close(a, t([[0.5, -1.0]]))
    assert not a.requires_grad


def test_opd_loss_values_and_gradient():
    """B = 2, T = 3, masks [1,1,0] and [1,1,0] (padding logp = −inf in row 1 is ignored).

    row 0: −(1/2)(0.5·(−1) + (−1)·(−2)) = −(1/2)(1.5)   = −0.75
    row 1: −(1/2)(1·(−0.5) + 1·(−0.5))  = −(1/2)(−1)    =  0.5
    L = (−0.75 + 0.5)/2 = −0.125
    dL/dlogp = −A / (T_b · B): row 0 [−0.125, 0.25, 0], row 1 [−0.25, −0.25, 0]; no gradient into A.
    """
    adv = t([[0.5, -1.0, 2.0], [1.0, 1.0, 1.0]], requires_grad=True)
    logp = t([[-1.0, -2.0, -3.0], [-0.5, -0.5, -math.inf]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    loss = opd_loss(adv, logp, mask)
    torch.testing.assert_close(loss, t(-0.125))
    loss.backward()
    torch.testing.assert_close(logp.grad, t([[-0.125, 0.25, 0.0], [-0.25, -0.25, 0.0]]))
    assert adv.grad is None


def test_opd_loss_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"sequences \[1\] have no valid token"):
        opd_loss(x, x, torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="only 0/1"):
        opd_loss(x, x, torch.full((2, 3), 0.5))


# ---------------------------------------------------------------------------------------- Eq. 4


def _pg_case():
    """N = 3, T = 2: ratios [[1.5, 0.5], [1, 2], [0.5, 1.5]], A = [1, −2, −1], mask row 1 = [1, 0]."""
    old = t([[-1.0, -2.0], [-0.5, -0.7], [-1.2, -0.3]])
    ratio = t([[1.5, 0.5], [1.0, 2.0], [0.5, 1.5]])
    logp = (old + ratio.log()).requires_grad_(True)
    adv = t([1.0, -2.0, -1.0])
    mask = torch.tensor([[True, True], [True, False], [True, True]])
    return logp, old, adv, mask


def test_policy_gradient_loss_no_clip_values():
    """per token −ρA: row 0 [−1.5, −0.5] -> −1; row 1 [2] -> 2; row 2 (A=−1) [0.5, 1.5] -> 1.

    L = (−1 + 2 + 1)/3 = 2/3; no clip -> clip_fraction 0; no reference -> kl 0.
    """
    logp, old, adv, mask = _pg_case()
    out = policy_gradient_loss(logp, old, adv, mask, clip_eps=None, aggregate="sequence_mean")
    assert isinstance(out, PolicyLossOutput)
    torch.testing.assert_close(out.loss, t(2 / 3))
    torch.testing.assert_close(out.pg_loss, t(2 / 3))
    assert out.kl.item() == 0.0 and out.clip_fraction.item() == 0.0


def test_policy_gradient_loss_clip_values_and_zero_gradient():
    """ε = 0.2, per token −min(ρA, clip(ρ, .8, 1.2)A):

    row 0 (A=1):  ρ=1.5 -> −min(1.5, 1.2) = −1.2 (clipped);  ρ=0.5 -> −min(0.5, 0.8) = −0.5 -> mean −0.85
    row 1 (A=−2): ρ=1   -> 2                                                           -> mean 2
    row 2 (A=−1): ρ=0.5 -> −min(−0.5, −0.8) = 0.8 (clipped); ρ=1.5 -> −min(−1.5, −1.2) = 1.5 -> mean 1.15
    L = (−0.85 + 2 + 1.15)/3 = 2.3/3; clip_fraction = (1/2 + 0 + 1/2)/3 = 1/3.
    Gradient −ρA/(T_n·N) on unclipped valid tokens, 0 on clipped ones and padding:
      row 0 [0, −0.5/6], row 1 [2/3, 0], row 2 [0, 1.5/6].
    """
    logp, old, adv, mask = _pg_case()
    out = policy_gradient_loss(logp, old, adv, mask, clip_eps=0.2, aggregate="sequence_mean")
    torch.testing.assert_close(out.loss, t(2.3 / 3))
    torch.testing.assert_close(out.clip_fraction, t(1 / 3))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, t([[0.0, -0.5 / 6], [2 / 3, 0.0], [0.0, 1.5 / 6]]))


@pytest.mark.parametrize("aggregate", ["sum", "sequence_mean", "token_mean"])
@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_policy_gradient_loss_on_policy_is_reinforce(clip_eps, aggregate):
    """old = logp.detach() -> ρ ≡ 1, so ∇L = ∇ agg(−A_n logp_{n,t}) (REINFORCE), agg the aggregation."""
    torch.manual_seed(4)
    n, t_len, vocab = 4, 5, 7
    logits = torch.randn(n, t_len, vocab, dtype=F64, requires_grad=True)
    tokens = torch.randint(vocab, (n, t_len))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0]])
    adv = torch.randn(n, dtype=F64)

    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)  # [N, T]
    policy_gradient_loss(
        logp, logp.detach(), adv, mask, clip_eps=clip_eps, aggregate=aggregate
    ).loss.backward()
    got = logits.grad.clone()

    logits.grad = None
    logp = logits.log_softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
    m = mask.to(F64)
    terms = -adv[:, None] * logp * m  # [N, T]
    expected = {
        "sum": terms.sum(-1).mean(),
        "sequence_mean": (terms.sum(-1) / m.sum(-1)).mean(),
        "token_mean": terms.sum() / m.sum(),
    }[aggregate]
    expected.backward()
    torch.testing.assert_close(got, logits.grad)


def test_policy_gradient_loss_kl_k3():
    """N = 1, T = 2, ρ = 1, A = 1, β = 0.1, ref − logp = [ln 2, 0]:

    k3 = e^d − d − 1 = [1 − ln2, 0] -> kl = (1 − ln2)/2 = 0.153426; pg = −1; L = −1 + 0.1·kl.
    dL/dlogp = (−A + β(1 − e^d))/T = [(−1 − 0.1)/2, −1/2] = [−0.55, −0.5].
    """
    logp = t([[-1.0, -2.0]], requires_grad=True)
    ref = t([[-1.0 + math.log(2), -2.0]])
    out = policy_gradient_loss(
        logp, logp.detach(), t([1.0]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1, aggregate="sequence_mean"
    )
    kl = (1 - math.log(2)) / 2
    torch.testing.assert_close(out.kl, t(kl))
    torch.testing.assert_close(out.pg_loss, t(-1.0))
    torch.testing.assert_close(out.loss, t(-1.0 + 0.1 * kl))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, t([[-0.55, -0.5]]))


@pytest.mark.parametrize(
    "aggregate, loss, weights",
    [
        # (1/N) Σ_n Σ_t: (−2 + 2 − 2)/3; each token's gradient weight 1/N = 1/3
        ("sum", -2 / 3, [[1 / 3, 1 / 3], [1 / 3, 0], [1 / 3, 1 / 3]]),
        # (1/N) Σ_n mean_t: (−1 + 2 − 1)/3 = 0; weights 1/(N |o_n|)
        ("sequence_mean", 0.0, [[1 / 6, 1 / 6], [1 / 3, 0], [1 / 6, 1 / 6]]),
        # Σ_n Σ_t / Σ_n |o_n|: (−1.5 − 0.5 + 2 − 0.5 − 1.5)/5 = −2/5; weights 1/5
        ("token_mean", -2 / 5, [[1 / 5, 1 / 5], [1 / 5, 0], [1 / 5, 1 / 5]]),
    ],
)
def test_policy_gradient_loss_aggregations(aggregate, loss, weights):
    """No clip, A = [1, −2, 1] on the ratios of _pg_case: per-token −ρA = [[−1.5, −0.5], [2, ·], [−0.5, −1.5]]
    (row 1 has one valid token). The three aggregations of ``policy_loss.aggregate`` by hand; the
    gradient of −ρA in logp is −ρA, times each token's weight. With β = 0.1 and ref = logp the KL is 0."""
    logp, old, _, mask = _pg_case()
    adv = t([1.0, -2.0, 1.0])
    out = policy_gradient_loss(
        logp, old, adv, mask, clip_eps=None, ref_logprobs=logp.detach(), beta=0.1, aggregate=aggregate
    )
    torch.testing.assert_close(out.pg_loss, t(loss))
    torch.testing.assert_close(out.loss, t(loss))
    out.loss.backward()
    per_token = t([[-1.5, -0.5], [2.0, 0.0], [-0.5, -1.5]])
    torch.testing.assert_close(logp.grad, per_token * t(weights))


def test_policy_gradient_loss_kl_sums_over_tokens_by_default():
    """Eq. 4 default ``sum``: the KL of the N = 1, T = 2 case above is (1 − ln 2) summed, not averaged."""
    logp = t([[-1.0, -2.0]], requires_grad=True)
    ref = t([[-1.0 + math.log(2), -2.0]])
    out = policy_gradient_loss(logp, logp.detach(), t([1.0]), torch.ones(1, 2), ref_logprobs=ref, beta=0.1)
    torch.testing.assert_close(out.kl, t(1 - math.log(2)))
    torch.testing.assert_close(out.pg_loss, t(-2.0))


def test_policy_gradient_loss_ignores_nonfinite_padding():
    logp = t([[-1.0, 0.0]], requires_grad=True)
    old = t([[-1.0, -math.inf]])
    ref = t([[-1.0, math.nan]])
    out = policy_gradient_loss(logp, old, t([2.0]), torch.tensor([[1, 0]]), ref_logprobs=ref, beta=0.5)
    torch.testing.assert_close(out.loss, t(-2.0))
    out.loss.backward()
    torch.testing.assert_close(logp.grad, t([[-2.0, 0.0]]))


def test_policy_gradient_loss_errors():
    x = torch.zeros(2, 3)
    m = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"advantages must have shape \[N\]=\(2,\)"):
        policy_gradient_loss(x, x, torch.zeros(2, 3), m)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_gradient_loss(x, x, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="clip_eps must be in"):
        policy_gradient_loss(x, x, torch.zeros(2), m, clip_eps=1.5)
    with pytest.raises(
        ValueError, match=r"aggregate must be one of \['sum', 'sequence_mean', 'token_mean'\]"
    ):
        policy_gradient_loss(x, x, torch.zeros(2), m, aggregate="mean")
    with pytest.raises(ValueError, match=r"logprobs \[N,T\]=\(2,3\) and old_logprobs \(2,4\)"):
        policy_gradient_loss(x, torch.zeros(2, 4), torch.zeros(2), m)
