"""GDSO teacher and GRPO baseline: rollouts, rewards, the Eq. 14 objective, Algorithm 1's schedule and
reference reset, end-to-end runs through ``zr train-reward``, resume and bad input.

Everything runs on a tiny Qwen3.5 (random weights) built offline, G = 2, a few sampled tokens.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from zr_diffusion.config import load_config  # noqa: E402
from zr_diffusion.data import ScoredRecord, build_pairs, load_records, save_image, write_records  # noqa: E402
from zr_diffusion.reward.config import GDSOConfig, TrainRewardConfig  # noqa: E402
from zr_diffusion.reward.gdso import (  # noqa: E402
    Schedule,
    gdso_loss,
    group_rewards,
    make_schedule,
    reward_scores,
)
from zr_diffusion.reward.rollouts import (  # noqa: E402
    PairBatch,
    PolicyReadout,
    ReferenceWeights,
    RolloutBatch,
    pair_batch,
    policy_readout,
    sample_rollouts,
)
from zr_diffusion.scores import ScoreGrid  # noqa: E402

FAMILY = "qwen3_5"
SIZE = 64  # on the Qwen3.5 grid (patch 16 x merge 2)

# prompt, dimension, scores of its images
_GROUPS = (
    ("a red circle above a blue square", "alignment", (1.5, 3.0, 4.5)),
    ("two green triangles next to a yellow star", "realism", (2.0, 4.0)),
)


def write_pair_records(folder: str | Path, size: int = SIZE, seed: int = 0) -> Path:
    """Write PNGs and ``train.jsonl`` (records whose same-prompt pairs have different scores) to
    ``folder``; returns the records file. Used by the tests and by configs/reward/*_tiny.yaml."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    records = []
    for p, (prompt, dim, scores) in enumerate(_GROUPS):
        for k, score in enumerate(scores):
            image = root / f"img{p}{k}.png"
            save_image(torch.rand(3, size, size, generator=g), image)
            records.append(ScoredRecord(f"r{p}{k}", prompt, image, dim, (score,)))
    write_records(records, root / "train.jsonl")
    return root / "train.jsonl"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Qwen3.5, 5 records (4 pairs), a file with no pair, and one with a second image size."""
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    root = tmp_path_factory.mktemp("gdso")
    model = make_tiny_vlm(root / "model", FAMILY)
    train = write_pair_records(root / "data")
    lonely = [
        ScoredRecord(f"x{k}", f"prompt {k}", root / "data" / "img00.png", "alignment", (1.0 + k,))
        for k in range(3)
    ]
    write_records(lonely, root / "data" / "nopairs.jsonl")
    save_image(torch.rand(3, 2 * SIZE, SIZE), root / "data" / "tall.png")
    mixed = load_records(train)[:2] + [
        ScoredRecord("tall", _GROUPS[0][0], root / "data" / "tall.png", "alignment", (5.0,))
    ]
    write_records(mixed, root / "data" / "mixed.jsonl")
    return {"root": root, "model": model, "train": train}


def _cfg(world, tmp_path, *overrides: str, config: str = "configs/reward/gdso_tiny.yaml"):
    base = [
        f"model={world['model']}",
        f"data.train={world['train']}",
        "data.eval=null",
        f"run.output_dir={tmp_path / 'run'}",
    ]
    return load_config(TrainRewardConfig, config, base + list(overrides))


@pytest.fixture(scope="module")
def policy(world, tmp_path_factory):
    """The trainable LoRA policy of the tiny config (common.setup_policy) and its training pairs."""
    from zr_diffusion.reward.policy import setup_policy
    from zr_diffusion.training import make_accelerator

    cfg = _cfg(world, tmp_path_factory.mktemp("policy"))
    accelerator = make_accelerator(cfg.run)
    pol = setup_policy(cfg, accelerator)
    grid = cfg.grid.build()
    pairs = build_pairs(load_records(world["train"], grid=grid))
    return {"cfg": cfg, "policy": pol, "grid": grid, "pairs": pair_batch(pairs[:2], grid)}


def _rollouts(pol, pairs, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"group_size": 2, "max_new_tokens": 6, "generator": torch.Generator().manual_seed(seed)} | kw
    return sample_rollouts(pol.plain_scorer, pairs, **kw)


class _ForceMarker:
    """Logits processor: rows ``rows`` write one free token, then the score marker."""

    def __init__(self, marker_ids, rows):
        self.marker, self.rows, self.start = list(marker_ids), list(rows), None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        t = input_ids.shape[1] - self.start
        if 1 <= t <= len(self.marker):
            for r in self.rows:
                scores[r] = -math.inf
                scores[r, self.marker[t - 1]] = 0.0
        return scores


# --------------------------------------------------------------------------------------------------
# rollouts


def test_rollout_shapes_and_marker_handling(policy):
    pol, pairs, grid = policy["policy"], policy["pairs"], policy["grid"]
    scorer = pol.plain_scorer
    marker = list(scorer.marker_ids)
    force = _ForceMarker(marker, rows=[0, 1])  # pair 0, side w, both outputs write the marker
    ro = _rollouts(pol, pairs, logits_processor=[force])
    b, g, s = 2, 2, grid.num_bins
    t = ro.token_ids.shape[-1]
    assert (
        ro.token_ids.shape
        == ro.token_mask.shape
        == ro.loss_mask.shape
        == ro.old_logprobs.shape
        == (b, 2, g, t)
    )
    assert ro.score_index.shape == ro.marker_appended.shape == (b, 2, g)
    assert ro.old_score_logits.shape == (b, 2, g, s) and ro.ref_logprobs is None
    assert torch.allclose(ro.old_probs.sum(-1), torch.ones(b, 2, g))
    flat_ids, flat_tok, flat_loss = (
        ro.token_ids.view(-1, t),
        ro.token_mask.view(-1, t),
        ro.loss_mask.view(-1, t),
    )
    appended = ro.marker_appended.flatten()
    assert not appended[0] and not appended[1]
    for k, suffix in enumerate(ro.suffix_ids):
        n = len(suffix)
        assert flat_ids[k, t - 1 - n : t - 1].tolist() == list(suffix)  # right-aligned suffix
        assert (
            flat_ids[k, -1].item() == scorer.token_ids[ro.score_index.flatten()[k]]
        )  # then the score token a
        assert flat_tok[k].sum() == n + 1 and flat_tok[k, t - 1 - n :].all()
        assert list(suffix[-len(marker) :]) == marker  # every output ends in the marker
        # the policy sampled everything but an appended marker
        sampled = n - (len(marker) if appended[k] else 0)
        assert flat_loss[k].sum() == sampled + 1
        assert flat_loss[k, -1] and flat_loss[k, t - 1 - n : t - 1 - n + sampled].all()
    assert list(ro.suffix_ids[0]) == list(ro.suffix_ids[0][:1]) + marker  # one free token + generated marker
    assert (ro.old_logprobs[~ro.token_mask] == 0).all() and (ro.old_logprobs[ro.token_mask] < 0).all()
    # old log-probs are the policy's own: a fresh forward pass with the same weights gives them
    with torch.no_grad():
        again = policy_readout(pol.plain_scorer, ro)
    assert torch.allclose(again.logprobs, ro.old_logprobs, atol=1e-5)
    assert torch.allclose(again.score_logits, ro.old_score_logits, atol=1e-5)
    # seeded: the same seed gives the same rollouts
    again = _rollouts(pol, pairs, logits_processor=[_ForceMarker(marker, [0, 1])])
    assert again.suffix_ids == ro.suffix_ids and torch.equal(again.score_index, ro.score_index)


def test_group_size_below_one_is_an_error(policy):
    with pytest.raises(ValueError, match=r"group_size \(G\) must be >= 1, got 0"):
        GDSOConfig(group_size=0)
    with pytest.raises(ValueError, match=r"group_size \(G\) must be >= 1"):
        _rollouts(policy["policy"], policy["pairs"], group_size=0)


# --------------------------------------------------------------------------------------------------
# rewards, advantages and the objective by hand


def _hand_case():
    """One pair, G = 2, a 3-bin grid {1, 2, 3} (range 2), ŝ_w = 3, ŝ_l = 2 (gap 1).

    q from logits log([1,1,2]), log([1,2,1]), log([2,1,1]) has μ = 2.25, 2.0, 1.75 exactly.
    Outputs: w: μ = (2.25, 2.0); l: μ = (1.75, 1.75).
    """
    grid = ScoreGrid(1.0, 3.0, 1.0, ("1", "2", "3"))
    w0, w1, lo = (torch.tensor(v).log() for v in ([1.0, 1.0, 2.0], [1.0, 2.0, 1.0], [2.0, 1.0, 1.0]))
    logits = torch.stack([torch.stack([w0, w1]), torch.stack([lo, lo])]).unsqueeze(0)  # [1, 2, 2, 3]
    pairs = PairBatch(
        images=torch.zeros(1, 2, 3, 4, 4),
        prompts=("p",),
        dimensions=("alignment",),
        scores=torch.tensor([[3.0, 2.0]]),
        score_bins=torch.tensor([[2, 1]]),
    )
    t = 3  # two reasoning tokens, then the score token
    mask = torch.ones(1, 2, 2, t, dtype=torch.bool)
    old = torch.full((1, 2, 2, t), -1.0)
    rollout = RolloutBatch(
        pairs=pairs,
        suffix_ids=((5, 6),) * 4,
        token_ids=torch.zeros(1, 2, 2, t, dtype=torch.long),
        token_mask=mask,
        loss_mask=mask,
        score_index=torch.tensor([[[2, 1], [0, 0]]]),
        old_logprobs=old,
        ref_logprobs=None,
        old_score_logits=logits,
        marker_appended=torch.zeros(1, 2, 2, dtype=torch.bool),
    )
    return grid, rollout


def test_rewards_advantages_and_loss_by_hand():
    """Eq. 7: r_pt,w = 1 − |μ − 3|/2 = (0.625, 0.5); r_pt,l = 1 − 0.25/2 = (0.875, 0.875).
    Eq. 10 (gap +1 for w, −1 for l): r_pw,w,i = 1 − Σ_k |μ_w,i − 1.75 − 1| / (2·2) = (0.75, 0.625);
    r_pw,l = 1 − (|1.75 − 2.25 + 1| + |1.75 − 2 + 1|)/4 = 1 − 1.25/4 = 0.6875 for both.
    Eq. 13 (λ = 1, 1): r_w = (1.375, 1.125), r_l = (1.5625, 1.5625).
    Eq. 3: A_w = ±0.125 / std(1.375, 1.125) = ±0.125/0.17678 = ±0.70711; A_l = 0 (equal rewards).
    Eq. 14 with π_θ = π_old (ratio 1): L_GRPO = mean_n Σ_t (−A_n) = 0 (Eq. 4's sum, the default).
    Eq. 8: L_CE = −(log 0.5 + log 0.25 + 2 log 0.25)/(2·2) = (log 2 + 6 log 2)/4 = 1.21301.
    Eq. 11: L_pw = mean_{i,k} |μ_w,i − μ_l,k − 1| / 2 = (0.5 + 0.5 + 0.75 + 0.75)/4/2 = 0.3125.
    L = 0 + 1.21301 + 0.3125 = 1.52551. The gradient of L_GRPO on a token of output (w, 0) is
    −A/4 outputs with ``policy_loss.aggregate: sum``, −A/(3 tokens · 4 outputs) with ``sequence_mean``
    and −A/(12 tokens) with ``token_mean`` (all outputs have 3 tokens here).
    """
    grid, rollout = _hand_case()
    cfg = GDSOConfig(group_size=2)
    mu = reward_scores(rollout, grid)
    assert torch.allclose(mu, torch.tensor([[[2.25, 2.0], [1.75, 1.75]]]))
    rw = group_rewards(mu, rollout.pairs.scores, grid, cfg)
    assert torch.allclose(rw.pointwise, torch.tensor([[[0.625, 0.5], [0.875, 0.875]]]))
    assert torch.allclose(rw.pairwise, torch.tensor([[[0.75, 0.625], [0.6875, 0.6875]]]))
    assert torch.allclose(rw.reward, torch.tensor([[[1.375, 1.125], [1.5625, 1.5625]]]))
    a = 0.125 / (0.125 * math.sqrt(2) + cfg.eps)
    assert torch.allclose(rw.advantages, torch.tensor([[[a, -a], [0.0, 0.0]]]))

    logprobs = rollout.old_logprobs.clone().requires_grad_(True)
    terms = gdso_loss(PolicyReadout(logprobs, rollout.old_score_logits), rollout, rw.advantages, grid, cfg)
    assert terms.policy.pg_loss.item() == pytest.approx(0.0, abs=1e-7)
    assert terms.pointwise_ce.item() == pytest.approx(7 * math.log(2) / 4, abs=1e-6)
    assert terms.pairwise_gap.item() == pytest.approx(0.3125, abs=1e-6)
    assert terms.loss.item() == pytest.approx(7 * math.log(2) / 4 + 0.3125, abs=1e-6)
    (grad,) = torch.autograd.grad(terms.loss, logprobs)
    assert torch.allclose(grad[0, 0, 0], torch.full((3,), -a / 4), atol=1e-7)
    assert torch.allclose(grad[0, 1], torch.zeros(2, 3))
    for aggregate in ("sequence_mean", "token_mean"):
        terms = gdso_loss(
            PolicyReadout(logprobs, rollout.old_score_logits),
            rollout,
            rw.advantages,
            grid,
            cfg,
            aggregate=aggregate,
        )
        (grad,) = torch.autograd.grad(terms.loss, logprobs)
        assert torch.allclose(grad[0, 0, 0], torch.full((3,), -a / 12), atol=1e-7)

    # parsed_text: the reward scores the written token's bin (w: 3, 2; l: 1, 1), not E_q
    parsed = reward_scores(rollout, grid, "parsed_text")
    assert torch.equal(parsed, torch.tensor([[[3.0, 2.0], [1.0, 1.0]]]))


def test_nan_term_is_caught_before_backward():
    grid, rollout = _hand_case()
    cfg = GDSOConfig(group_size=2)
    rw = group_rewards(reward_scores(rollout, grid), rollout.pairs.scores, grid, cfg)
    bad = rollout.old_score_logits.clone()
    bad[0, 1, 0, 0] = math.nan
    with pytest.raises(FloatingPointError, match="step 7: loss term 'pointwise_ce'"):
        gdso_loss(PolicyReadout(rollout.old_logprobs, bad), rollout, rw.advantages, grid, cfg, step=7)
    # an unused (α = 0) non-finite term does not poison the objective
    quiet = GDSOConfig(group_size=2, alpha_pt=0.0, alpha_pw=0.0)
    terms = gdso_loss(PolicyReadout(rollout.old_logprobs, bad), rollout, rw.advantages, grid, quiet)
    assert torch.isfinite(terms.loss) and not torch.isfinite(terms.pointwise_ce)


# --------------------------------------------------------------------------------------------------
# GRPO, clipping, the reference policy


def _grads(loss, params):
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


def test_gdso_without_direct_losses_equals_grpo(policy):
    """Same rollouts in, identical loss out: GDSO with α_pt = α_pw = 0, λ_pw = 0 is GRPO (whose α the
    recipe forces to 0, so the GRPO config's α = 1 is ignored)."""
    pol, pairs, grid = policy["policy"], policy["pairs"], policy["grid"]
    ro = _rollouts(pol, pairs, seed=1)
    gdso = GDSOConfig(group_size=2, alpha_pt=0.0, alpha_pw=0.0, lambda_pw=0.0)
    grpo = GDSOConfig(group_size=2, lambda_pw=0.0)  # alpha_pt = alpha_pw = 1.0 in the config
    adv_gdso = group_rewards(reward_scores(ro, grid), pairs.scores, grid, gdso).advantages
    adv_grpo = group_rewards(reward_scores(ro, grid), pairs.scores, grid, grpo).advantages
    assert torch.equal(adv_gdso, adv_grpo)
    readout = policy_readout(pol.scorer, ro)
    l_gdso = gdso_loss(readout, ro, adv_gdso, grid, gdso, "gdso")
    l_grpo = gdso_loss(readout, ro, adv_grpo, grid, grpo, "grpo")
    assert torch.equal(l_gdso.loss, l_grpo.loss)
    for a, b in zip(_grads(l_gdso.loss, pol.params), _grads(l_grpo.loss, pol.params)):
        assert (a is None and b is None) or torch.equal(a, b)
    # with the direct losses on, GDSO is a different objective
    full = gdso_loss(readout, ro, adv_gdso, grid, GDSOConfig(group_size=2, lambda_pw=0.0), "gdso")
    assert full.loss.item() == pytest.approx(
        l_grpo.loss.item() + full.pointwise_ce.item() + full.pairwise_gap.item(), rel=1e-5
    )


def _sgd_step(pol, loss, lr):
    grads = torch.autograd.grad(loss, pol.params, allow_unused=True)
    with torch.no_grad():
        for p, g in zip(pol.params, grads):
            if g is not None:
                p -= lr * g / (g.norm() + 1e-12)


def test_second_update_is_clipped_against_pi_old(policy):
    """K = 2: after one update the ratio π_θ/π_old leaves [1 − ε, 1 + ε] on some tokens and the clip
    removes their gradient; with K = 1 the same tensors are not clipped."""
    pol, pairs, grid = policy["policy"], policy["pairs"], policy["grid"]
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    try:
        ro = _rollouts(pol, pairs, seed=2)
        k2 = GDSOConfig(group_size=2, updates_per_batch=2, clip_eps=0.05)
        adv = group_rewards(reward_scores(ro, grid), pairs.scores, grid, k2).advantages
        first = gdso_loss(policy_readout(pol.scorer, ro), ro, adv, grid, k2)
        assert first.policy.clip_fraction.item() == 0.0  # π_θ = π_old on the first update
        _sgd_step(pol, first.policy.loss, lr=2.0)
        readout = policy_readout(pol.scorer, ro)
        second = gdso_loss(readout, ro, adv, grid, k2)
        assert torch.isfinite(second.loss) and second.policy.clip_fraction.item() > 0
        unclipped = gdso_loss(readout, ro, adv, grid, GDSOConfig(group_size=2, updates_per_batch=1))
        assert unclipped.policy.clip_fraction.item() == 0
        assert unclipped.policy.pg_loss.item() != pytest.approx(second.policy.pg_loss.item())
    finally:
        with torch.no_grad():
            for n, p in pol.model.named_parameters():
                if n in before:
                    p.copy_(before[n])


def test_reference_is_the_policy_at_iteration_start(policy):
    pol, pairs = policy["policy"], policy["pairs"]
    before = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
    ref = ReferenceWeights(pol.model)
    try:
        ref.reset()  # π_ref ← π_θ
        ro = _rollouts(pol, pairs, seed=3, reference=ref)
        assert torch.equal(ro.ref_logprobs, ro.old_logprobs)
        with torch.no_grad():  # an update (LoRA B starts at 0: make the adapter do something)
            for p in pol.params:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        moved = {n: p.detach().clone() for n, p in pol.model.named_parameters() if p.requires_grad}
        ro = _rollouts(pol, pairs, seed=3, reference=ref)
        assert (ro.ref_logprobs - ro.old_logprobs)[ro.token_mask].abs().max() > 1e-3
        for n, p in pol.model.named_parameters():  # the swap put the current weights back exactly
            if n in moved:
                assert torch.equal(p, moved[n])
        ref.reset()  # the next iteration starts from the moved weights, not from the base model
        ro = _rollouts(pol, pairs, seed=3, reference=ref)
        assert torch.equal(ro.ref_logprobs, ro.old_logprobs)
        state = ref.state_dict()  # checkpointed with the run
        fresh = ReferenceWeights(pol.model)
        fresh.load_state_dict(state)
        assert all(torch.equal(fresh.weights[n], moved[n]) for n in moved)
    finally:
        with torch.no_grad():
            for n, p in pol.model.named_parameters():
                if n in before:
                    p.copy_(before[n])


# --------------------------------------------------------------------------------------------------
# the schedule


def test_schedule_maps_steps_to_iterations_batches_updates():
    s = Schedule(iterations=2, steps_per_iteration=3, updates_per_batch=2)
    assert s.total == 12
    assert [s.position(i) for i in (0, 1, 2, 5, 6, 11)] == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 0),
        (0, 2, 1),
        (1, 0, 0),
        (1, 2, 1),
    ]
    assert [i for i in range(12) if s.starts_iteration(i)] == [0, 6]
    assert s.rollout_index(7) == 3
    assert make_schedule(GDSOConfig(iterations=2, updates_per_batch=2), 12) == s
    assert make_schedule(GDSOConfig(iterations=2, updates_per_batch=2, steps_per_iteration=3), 12) == s
    with pytest.raises(ValueError, match=r"run.max_steps=10 must equal .*N=2.*M=3.*K=2\) = 12"):
        make_schedule(GDSOConfig(iterations=2, updates_per_batch=2, steps_per_iteration=3), 10)
    with pytest.raises(ValueError, match=r"run.max_steps=10 .* not a multiple of .*= 4"):
        make_schedule(GDSOConfig(iterations=2, updates_per_batch=2), 10)
    with pytest.raises(ValueError, match=r"run.save_every=3 must be a multiple of .*K=2"):
        make_schedule(GDSOConfig(iterations=2, updates_per_batch=2), 12, save_every=3)


# --------------------------------------------------------------------------------------------------
# end to end: zr train-reward


def _train(world, out: Path, *overrides: str, config: str = "configs/reward/gdso_tiny.yaml") -> int:
    from zr_diffusion.cli import main

    base = [
        f"model={world['model']}",
        f"data.train={world['train']}",
        "data.eval=null",
        f"run.output_dir={out}",
    ]
    return main(["train-reward", "--config", config, *base, *overrides])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check_trained_model(world, out: Path) -> None:
    """LoRA moved; the merged model differs from the base only in LoRA-targeted language-model
    weights (never the vision tower); the folder loads as a ZRewardModel."""
    from zr_diffusion.reward.model import ZRewardModel

    adapter = _safetensors(out / "model" / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # initialised at zero, so they moved
    base = _safetensors(world["model"] / "model.safetensors")
    merged = _safetensors(out / "model" / "model.safetensors")
    assert set(merged) == set(base)
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    targeted = {k.removeprefix("base_model.model.").split(".lora_")[0] + ".weight" for k in adapter}
    assert changed and changed <= targeted  # base weights outside the adapted layers did not move
    assert all("language_model" in k for k in targeted) and not any("visual" in k for k in changed)
    reward = ZRewardModel.from_pretrained(out / "model", dimensions=["alignment"])
    out_ = reward(torch.rand(1, 3, SIZE, SIZE), ["a red circle above a blue square"])
    assert torch.isfinite(out_.mu).all()


@pytest.fixture(scope="module")
def gdso_run(world, tmp_path_factory):
    """configs/reward/gdso_tiny.yaml as shipped: N = 2 iterations x M = 1 batch x K = 2 updates, β > 0."""
    out = tmp_path_factory.mktemp("gdso_run")
    assert _train(world, out, f"data.eval={world['train']}") == 0  # teacher-mode HPA at the end
    return out


def test_gdso_end_to_end(world, gdso_run):
    m = _metrics(gdso_run)
    assert m["steps"] == 4 and [r["step"] for r in m["train"]] == [1, 2, 3, 4]
    for row in m["train"]:
        assert all(math.isfinite(v) for v in row.values())
        assert {"pointwise_ce", "pairwise_gap", "pg_loss", "kl", "clip_fraction", "reward"} <= set(row)
    kl = [r["kl"] for r in m["train"]]
    # π_ref ← π_θ at each iteration start (steps 1, 3): KL 0 on its first update, > 0 after one update
    assert abs(kl[0]) < 1e-7 and abs(kl[2]) < 1e-7 and kl[1] > 0 and kl[3] > 0
    # the two updates of a rollout batch see the same rollouts (rewards are logged per batch)
    assert m["train"][0]["reward"] == m["train"][1]["reward"]
    final = m["eval"][-1]
    # HPA is a fraction of the 4 same-prompt pairs (Eq. 17), not of records or of a score difference
    assert final["step"] == 4 and final["records"] == 5 and final["pairs"] == 4
    assert final["hpa"] in (0.0, 0.25, 0.5, 0.75, 1.0), final
    _check_trained_model(world, gdso_run)


def test_grpo_end_to_end_and_resume_inside_an_iteration(world, tmp_path, monkeypatch):
    """GRPO (N = 1, M = 2, K = 1): an uninterrupted run, and one stopped after step 1 and resumed in
    the middle of the iteration, whose π_ref must come back from the checkpoint, end equal."""
    from zr_diffusion.reward import gdso as gdso_module

    over = ["gdso.iterations=1", "gdso.steps_per_iteration=2", "gdso.updates_per_batch=1",
            "run.max_steps=2", "run.save_every=1", "gdso.alpha_pt=1.0"]  # fmt: skip  # α_pt is ignored
    full = tmp_path / "full"
    assert _train(world, full, *over, config="configs/reward/grpo_tiny.yaml") == 0
    m = _metrics(full)
    # L_CE is reported: the tiny random model's q is near uniform over the S = 9 bins, so L_CE ≈ log 9;
    # it is not added (loss = pg + β KL below, although α_pt = 1 would add about 2.2)
    assert all(r["pointwise_ce"] == pytest.approx(math.log(9), abs=0.1) for r in m["train"])
    assert all(math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["pg_loss"] + 0.1 * r["kl"], abs=1e-6)
               for r in m["train"])  # fmt: skip  # no direct losses in the objective
    _check_trained_model(world, full)

    call = gdso_module.GDSOStep.__call__

    def stop_at_step_1(self, step, batch):
        if step == 1:
            raise RuntimeError("stopped")
        return call(self, step, batch)

    part = tmp_path / "part"
    monkeypatch.setattr(gdso_module.GDSOStep, "__call__", stop_at_step_1)
    with pytest.raises(RuntimeError, match="stopped"):
        _train(world, part, *over, config="configs/reward/grpo_tiny.yaml")
    monkeypatch.setattr(gdso_module.GDSOStep, "__call__", call)
    assert (part / "checkpoints" / "step-0000001").is_dir() and not (part / "model").exists()
    assert _train(world, part, *over, "--resume", config="configs/reward/grpo_tiny.yaml") == 0
    a = _safetensors(full / "model" / "adapter" / "adapter_model.safetensors")
    b = _safetensors(part / "model" / "adapter" / "adapter_model.safetensors")
    assert set(a) == set(b) and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert _metrics(part)["train"][-1]["loss"] == pytest.approx(m["train"][-1]["loss"], abs=1e-6)


def test_gdso_resume_equals_uninterrupted(world, gdso_run, tmp_path, monkeypatch):
    """Stop the shipped tiny GDSO run after step 2 (a checkpoint at a rollout-batch boundary), resume."""
    from zr_diffusion.reward import gdso as gdso_module

    call = gdso_module.GDSOStep.__call__

    def stop_at_step_2(self, step, batch):
        if step == 2:
            raise RuntimeError("stopped")
        return call(self, step, batch)

    monkeypatch.setattr(gdso_module.GDSOStep, "__call__", stop_at_step_2)
    with pytest.raises(RuntimeError, match="stopped"):
        _train(world, tmp_path)
    monkeypatch.setattr(gdso_module.GDSOStep, "__call__", call)
    assert _train(world, tmp_path, "--resume") == 0
    a = _safetensors(gdso_run / "model" / "adapter" / "adapter_model.safetensors")
    b = _safetensors(tmp_path / "model" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    full, resumed = _metrics(gdso_run)["train"], _metrics(tmp_path)["train"]
    assert [r["step"] for r in resumed][-2:] == [3, 4]  # the stopped run wrote no metrics.json
    for x, y in zip(full[2:], resumed[-2:]):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6) and x["reward"] == pytest.approx(y["reward"])


# --------------------------------------------------------------------------------------------------
# bad input


def test_bad_inputs_are_clear_errors(world, tmp_path, capsys):
    data = world["train"].parent
    cases = [
        (
            [f"data.train={data / 'nopairs.jsonl'}"],
            r"nopairs\.jsonl has 3 record\(s\) but no preference pair",
        ),
        (["gdso.group_size=0"], r"group_size \(G\) must be >= 1, got 0"),
        (["run.max_steps=5"], r"run.max_steps=5 must equal .*\(K=2\) = 4"),
        (["run.save_every=1"], r"run.save_every=1 must be a multiple of gdso.updates_per_batch \(K=2\)"),
        ([f"data.train={data / 'mixed.jsonl'}"], r"2 sizes .* set gdso.image_size"),
    ]
    for overrides, pattern in cases:
        assert _train(world, tmp_path / "bad", *overrides) == 2, overrides
        assert re.search(pattern, capsys.readouterr().err), overrides
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_nan_loss_never_reaches_the_optimizer(world, tmp_path, monkeypatch, capsys):
    from zr_diffusion.reward import gdso as gdso_module

    readout = gdso_module.policy_readout
    steps = []

    def poisoned(scorer, rollout, features=None):
        out = readout(scorer, rollout, features)
        if len(steps) >= 1:  # the second optimizer step
            return out._replace(score_logits=out.score_logits * math.nan)
        return out

    real_step = torch.optim.AdamW.step

    def counting_step(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(gdso_module, "policy_readout", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    over = ["gdso.iterations=1", "gdso.updates_per_batch=1", "gdso.steps_per_iteration=2", "run.max_steps=2",
            "run.save_every=1"]  # fmt: skip
    assert _train(world, tmp_path, *over) == 2
    assert re.search(
        r"step 1: loss term '\w+' is nan; the optimizer step was skipped", capsys.readouterr().err
    )
    assert len(steps) == 1  # the NaN step took no optimizer step
    assert (tmp_path / "checkpoints" / "step-0000001").is_dir() and not (tmp_path / "model").exists()


def test_policy_loss_aggregate_config():
    from zr_diffusion.reward.config import PolicyLossConfig, RewardDataConfig, TrainRewardConfig

    cfg = TrainRewardConfig(model="m", data=RewardDataConfig(train="t.jsonl"))
    assert cfg.policy_loss.aggregate == "sum"  # Eq. 4
    with pytest.raises(
        ValueError, match=r"policy_loss.aggregate must be one of \['sum', 'sequence_mean', 'token_mean'\]"
    ):
        PolicyLossConfig(aggregate="mean")
