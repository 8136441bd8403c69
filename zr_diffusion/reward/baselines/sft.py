"""SFT baseline (METHOD.md §4): cross-entropy on the annotated score token, no reasoning.

Student template: the score token comes right after the prompt. The loss is the cross-entropy over
the FULL vocabulary at that position (as plain next-token SFT would train it), so probability mass
also moves off non-score tokens; the reward is still read from the S score-token logits only.
A record with several annotators is trained towards their empirical distribution over the bins
(soft-target cross-entropy; one annotator gives the usual one-hot target).
"""

from __future__ import annotations

import torch

from zr_diffusion.reward.loop import TrainResult, run_training
from zr_diffusion.reward.policy import setup_policy
from zr_diffusion.reward.records import load_eval_records, load_train_records
from zr_diffusion.reward.scoring import answer_logits, hpa_eval_fn
from zr_diffusion.scores import ScoreGrid, expected_score, gather_score_logits, score_distribution
from zr_diffusion.training import make_accelerator


def annotation_targets(records, grid: ScoreGrid) -> torch.Tensor:
    """Per record, the annotators' empirical distribution over the S bins: ``[N, S]``."""
    targets = torch.zeros(len(records), grid.num_bins)
    for n, rec in enumerate(records):
        for s in rec.scores:
            targets[n, grid.bin_index(s, where=f"{rec.source}: ")] += 1.0 / len(rec.scores)
    return targets


def train_sft(cfg) -> TrainResult:
    accelerator = make_accelerator(cfg.run)
    records = load_train_records(cfg)
    eval_records = load_eval_records(cfg)
    grid = cfg.grid.build()
    targets = annotation_targets(records, grid)  # [N, S]
    policy = setup_policy(cfg, accelerator)
    token_ids = torch.tensor(policy.scorer.token_ids)
    bins = grid.values()

    def step_fn(step: int, batch: list[int]) -> dict[str, torch.Tensor]:
        logits = answer_logits(policy.scorer, [records[i] for i in batch]).float()  # [B, V]
        log_p = torch.log_softmax(logits, dim=-1)  # [B, V], full vocabulary
        target = targets[batch].to(logits.device)  # [B, S]
        ce = -(target * log_p[:, token_ids.to(logits.device)]).sum(-1).mean()
        with torch.no_grad():
            q = score_distribution(gather_score_logits(logits, token_ids))  # [B, S]
            mu = expected_score(q, bins)  # [B]
            target_mu = expected_score(target, bins)
            score_mass = log_p[:, token_ids.to(logits.device)].exp().sum(-1).mean()
        return {"loss": ce, "abs_err": (mu - target_mu).abs().mean(), "score_token_mass": score_mass}

    eval_fn = hpa_eval_fn(eval_records, cfg.data.dimensions, cfg.eval_batch_size)
    return run_training(cfg, accelerator, policy, step_fn, eval_fn, num_examples=len(records))
