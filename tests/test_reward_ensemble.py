"""Reward ensembles: the aggregates by hand, gradients against a hand-computed aggregate of the members
run alone, each member's own preprocessing and single vision pass, frozen members, config errors."""

from __future__ import annotations

import math

import pytest
import torch

from tests._vlm_fixtures import tiny_vlm_dir
from zr_diffusion.pipelines.config import RewardConfig
from zr_diffusion.reward.ensemble import ZRewardEnsemble, aggregate_rewards
from zr_diffusion.reward.model import ZRewardModel

PROMPTS = ["a red circle", "two green triangles next to a yellow star"]
DIMS = ("alignment", "realism")
WEIGHTS = (2.0, 1.0)


def test_aggregates_by_hand():
    r = torch.tensor([[1.0, 3.0], [2.0, 2.0]])  # [B=2, M=2]
    assert aggregate_rewards(r, "mean").tolist() == [2.0, 2.0]
    assert aggregate_rewards(r, "min").tolist() == [1.0, 2.0]
    # sample std of (1, 3) = sqrt(((1-2)² + (3-2)²) / 1) = sqrt(2); of (2, 2) = 0
    torch.testing.assert_close(
        aggregate_rewards(r, "mean_minus_std", 0.5), torch.tensor([2 - 0.5 * math.sqrt(2), 2.0])
    )
    three = torch.tensor([[1.0, 2.0, 6.0]])  # mean 3, sample var (4 + 1 + 9) / 2 = 7
    torch.testing.assert_close(
        aggregate_rewards(three, "mean_minus_std", 1.0), torch.tensor([3 - math.sqrt(7)])
    )
    with pytest.raises(ValueError, match="unknown aggregate 'max'"):
        aggregate_rewards(r, "max")
    with pytest.raises(ValueError, match="at least 2 members"):
        aggregate_rewards(r[:, :1], "mean_minus_std")


def test_std_of_agreeing_members_has_a_zero_gradient_not_nan():
    r = torch.tensor([[2.0, 2.0]], requires_grad=True)
    aggregate_rewards(r, "mean_minus_std", 1.0).sum().backward()
    assert r.grad.tolist() == [[0.5, 0.5]]  # d mean / d r_m only


@pytest.fixture(scope="module")
def members():
    """Two members of different families: different patch sizes and pixel budgets."""
    return [
        ZRewardModel.from_pretrained(tiny_vlm_dir(f), dimensions=DIMS, weights=WEIGHTS)
        for f in ("qwen2_vl", "qwen3_5")
    ]


def test_members_keep_their_own_preprocessing(members):
    a, b = (m.scorer.spec for m in members)
    assert (a.patch_size, a.max_pixels) != (b.patch_size, b.max_pixels)
    images = torch.rand(2, 3, 60, 60)
    (pa, ga), (pb, gb) = (m.scorer.preprocess(images) for m in members)  # [sum_patches, C*T*P*P], [B, 3]
    assert pa.shape[1] == 3 * a.temporal_patch_size * a.patch_size**2 != pb.shape[1]
    side = [int(g[0, 1]) * s.patch_size for g, s in ((ga, a), (gb, b))]  # each resized to its own grid
    assert side[0] % a.factor == 0 and side[1] % b.factor == 0 and side[0] != side[1]


@pytest.mark.parametrize("how, std_weight", [("mean", 1.0), ("min", 1.0), ("mean_minus_std", 0.7)])
def test_ensemble_reward_and_gradient_equal_the_hand_computed_aggregate(members, how, std_weight):
    ensemble = ZRewardEnsemble(members, aggregate=how, std_weight=std_weight)
    torch.manual_seed(0)
    pixels = torch.rand(2, 3, 60, 60)
    x = pixels.clone().requires_grad_(True)
    out = ensemble(x, PROMPTS)
    out.reward.sum().backward()

    y = pixels.clone().requires_grad_(True)
    r0, r1 = (m(y, PROMPTS).reward for m in members)  # [B] each, the members run alone
    hand = {
        "mean": (r0 + r1) / 2,
        "min": torch.where(r0 <= r1, r0, r1),
        "mean_minus_std": (r0 + r1) / 2 - std_weight * (r0 - r1).abs() / math.sqrt(2),  # std of two values
    }[how]
    hand.sum().backward()
    torch.testing.assert_close(out.reward, hand.detach())
    torch.testing.assert_close(out.members, torch.stack([r0, r1], 1).detach())
    assert x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-4, atol=1e-7)
    assert out.mu.shape == (2, 2) and out.probs.shape == (2, 2, 9)


def test_members_are_frozen_and_each_makes_one_vision_pass(members):
    ensemble = ZRewardEnsemble(members, aggregate="min").train()
    assert not any(p.requires_grad for p in ensemble.parameters())
    assert all(not m.vlm.training for m in ensemble.members)
    calls = [0, 0]
    handles = [
        m.vlm.model.visual.register_forward_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, m in enumerate(members)
    ]
    try:
        out = ensemble(torch.rand(2, 3, 60, 60), PROMPTS)
    finally:
        for h in handles:
            h.remove()
    assert calls == [1, 1] and out.mu.shape == (2, len(DIMS))  # one pass per member for both dimensions


def test_ensemble_errors(members):
    with pytest.raises(ValueError, match="needs at least 2 members"):
        ZRewardEnsemble(members[:1], aggregate="mean_minus_std")
    other = ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), dimensions=("aesthetics",))
    with pytest.raises(ValueError, match="same dimensions"):
        ZRewardEnsemble([members[0], other])
    with pytest.raises(ValueError, match="not both"):
        RewardConfig(model="a", models=("b", "c"))
    with pytest.raises(ValueError, match="with a single reward.model leave them unset"):
        RewardConfig(model="a", aggregate="min")
    with pytest.raises(ValueError, match="std_weight applies to reward.aggregate=mean_minus_std only"):
        RewardConfig(models=("a", "b"), aggregate="min", std_weight=0.5)
    with pytest.raises(ValueError, match="needs at least 2 reward.models"):
        RewardConfig(models=("a",), aggregate="mean_minus_std")
    with pytest.raises(ValueError, match="lists a model twice"):
        RewardConfig(models=("a", "a"))
    assert RewardConfig(models=("a", "b"), aggregate="mean_minus_std").sources == ("a", "b")


def test_reward_config_builds_a_single_model_or_an_ensemble():
    single = RewardConfig(model=str(tiny_vlm_dir("qwen2_vl")), dimensions=DIMS).build()
    assert type(single) is ZRewardModel
    ens = RewardConfig(
        models=(str(tiny_vlm_dir("qwen2_vl")), str(tiny_vlm_dir("qwen2_vl", seed=1))),
        aggregate="mean_minus_std",
        dimensions=DIMS,
    ).build()
    assert isinstance(ens, ZRewardEnsemble) and ens.std_weight == 1.0 and len(ens.members) == 2
