"""OPD baseline, student side (METHOD.md §4, Eq. 18–19): on-policy distillation.

Each step the student samples its own output in the teacher template: reasoning until the score
marker (``generate_reasoning``), then one score token drawn from its score distribution after the
marker at the rollout temperature, ``a ~ softmax(score_logits / τ)`` (as GDSO / GRPO rollouts do).
The frozen teacher scores the same tokens after the same prompt and image (its own processor, so
its own image-pad count). Per token ``A_t = log π_T(y_t) − log π_old(y_t)`` (Eq. 18,
stop-gradient) and the loss is ``−(1/T) Σ_t A_t log π_φ(y_t)`` (Eq. 19), mean over records, over
the tokens the student sampled: a marker appended because the student did not write it within the
budget is read (the score follows it) but is not in the loss, as in GRPO; a sampled EOS ends the
reasoning and, as in GRPO, is neither fed back nor in the loss (the marker is appended instead).
One update per rollout batch, so ``π_old`` is the current policy: its log-probs are the detached
log-probs of the same forward pass that carries the gradient.

Teacher and student must share a tokenizer (same vocabulary): checked at start-up. The trained
student reasons before scoring, so training-time evaluation reads it in teacher mode (one sampled
reasoning per record).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from zr_diffusion.reward.loop import TrainResult, run_training
from zr_diffusion.reward.losses import opd_advantages, opd_loss
from zr_diffusion.reward.policy import load_frozen, setup_policy
from zr_diffusion.reward.records import load_eval_records, load_train_records
from zr_diffusion.reward.rollouts import sample_score_tokens
from zr_diffusion.reward.scoring import hpa_eval_fn, record_suffix_readout, teacher_rollouts
from zr_diffusion.training import make_accelerator, step_generator

_SCORE_SALT = 7_919_000  # score-token draws differ from the loop's per-step seeds


def check_same_tokenizer(student_tokenizer, teacher_tokenizer, student: str, teacher: str) -> None:
    """Teacher log-probs are read on the student's token ids: the vocabularies must be identical."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if s_vocab == t_vocab:
        return
    only_s = sorted(set(s_vocab) - set(t_vocab))[:5]
    only_t = sorted(set(t_vocab) - set(s_vocab))[:5]
    moved = sorted(k for k in set(s_vocab) & set(t_vocab) if s_vocab[k] != t_vocab[k])[:5]
    raise ValueError(
        f"OPD needs the teacher and the student to share a tokenizer, but {student} has "
        f"{len(s_vocab)} tokens and distill.teacher {teacher} has {len(t_vocab)}; e.g. only in the "
        f"student: {only_s}, only in the teacher: {only_t}, different ids: {moved}. Use a teacher "
        f"and a student of the same model family (or RISD, which only needs the score tokens)"
    )


class StudentOutput(NamedTuple):
    """One on-policy output: reasoning + score marker + score token, and which tokens were sampled."""

    token_ids: list[int]
    sampled: list[bool]  # False on an appended marker's tokens


def sample_outputs(scorer, records, rollout, generator: torch.Generator) -> list[StudentOutput]:
    """One on-policy output per record: reasoning + score marker + a score token drawn from
    ``softmax(score_logits / rollout.temperature)`` with ``generator``."""
    samples = [s for (s,) in teacher_rollouts(scorer, records, rollout, num_samples=1)]
    logits = torch.stack([s.score_logits for s in samples])  # [B, S]
    bins = sample_score_tokens(logits, rollout.temperature, generator)  # [B]
    outputs = []
    for sample, b in zip(samples, bins.tolist()):
        appended = len(sample.token_ids) - sample.sampled_length
        sampled = [True] * sample.sampled_length + [False] * appended + [True]
        outputs.append(StudentOutput(list(sample.token_ids) + [scorer.token_ids[b]], sampled))
    return outputs


def sampled_mask(outputs: list[StudentOutput], t: int, device=None) -> torch.Tensor:
    """``[B, T]`` True on the sampled tokens of each output, right-aligned as ``suffix_readout`` aligns them."""
    mask = torch.zeros(len(outputs), t, dtype=torch.bool)
    for k, out in enumerate(outputs):
        mask[k, t - len(out.sampled) :] = torch.tensor(out.sampled)
    return mask.to(device)


def train_opd(cfg) -> TrainResult:
    from transformers import AutoTokenizer

    accelerator = make_accelerator(cfg.run)
    records = load_train_records(cfg)
    eval_records = load_eval_records(cfg)
    check_same_tokenizer(
        AutoTokenizer.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code),
        AutoTokenizer.from_pretrained(cfg.distill.teacher, trust_remote_code=cfg.trust_remote_code),
        cfg.model,
        cfg.distill.teacher,
    )
    teacher = load_frozen(cfg.distill.teacher, cfg, accelerator.device)
    policy = setup_policy(cfg, accelerator)

    def step_fn(step: int, batch: list[int]) -> dict[str, torch.Tensor]:
        recs = [records[i] for i in batch]
        policy.model.eval()  # sampling: no dropout, KV cache on
        generator = step_generator(cfg.run.seed + _SCORE_SALT, step, accelerator.process_index)
        with torch.no_grad():
            outputs = sample_outputs(policy.plain_scorer, recs, cfg.rollout, generator)
            suffixes = [out.token_ids for out in outputs]
            teacher_read = record_suffix_readout(teacher, recs, suffixes, mode="teacher")
        policy.model.train()
        read = record_suffix_readout(policy.scorer, recs, suffixes, mode="teacher")  # [B, T]
        if not torch.equal(teacher_read.token_mask, read.token_mask):
            raise RuntimeError("teacher and student read different token masks for the same outputs")
        mask = sampled_mask(outputs, read.token_mask.shape[1], read.token_mask.device)  # [B, T]
        adv = opd_advantages(
            teacher_read.token_logprobs.to(read.token_logprobs), read.token_logprobs.detach()
        )
        loss = opd_loss(adv, read.token_logprobs, mask)
        with torch.no_grad():
            reverse_kl = ((-adv) * mask).sum(-1) / mask.sum(-1)  # [B], per-token estimate of KL(π_φ ‖ π_T)
        return {
            "loss": loss,
            "reverse_kl": reverse_kl.mean(),
            "output_tokens": mask.sum(-1).float().mean(),
        }

    eval_fn = hpa_eval_fn(
        eval_records, cfg.data.dimensions, cfg.eval_batch_size, mode="teacher", rollout=cfg.rollout
    )
    return run_training(cfg, accelerator, policy, step_fn, eval_fn, num_examples=len(records))
