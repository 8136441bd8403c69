"""OPD baseline, student side (METHOD.md §4, Eq. 18–19): on-policy distillation.

Each step the student samples its own output in the teacher template: reasoning until the score
marker (``generate_reasoning``), then one score token drawn from its score distribution q after the
marker. The frozen teacher scores the same tokens after the same prompt and image (its own
processor, so its own image-pad count). Per token ``A_t = log π_T(y_t) − log π_old(y_t)`` (Eq. 18,
stop-gradient) and the loss is ``−(1/T) Σ_t A_t log π_φ(y_t)`` (Eq. 19), mean over records.
One update per rollout batch, so ``π_old`` is the current policy: its log-probs are the detached
log-probs of the same forward pass that carries the gradient.

Teacher and student must share a tokenizer (same vocabulary): checked at start-up. The trained
student reasons before scoring, so training-time evaluation reads it in teacher mode (one sampled
reasoning per record).
"""

from __future__ import annotations

import torch

from zr_diffusion.reward.loop import TrainResult, run_training
from zr_diffusion.reward.losses import opd_advantages, opd_loss
from zr_diffusion.reward.policy import load_frozen, setup_policy
from zr_diffusion.reward.records import load_eval_records, load_train_records
from zr_diffusion.reward.scoring import hpa_eval_fn, record_suffix_readout, teacher_rollouts
from zr_diffusion.training import make_accelerator


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


def sample_outputs(scorer, records, rollout) -> list[list[int]]:
    """One on-policy output per record: reasoning + score marker + a score token drawn from q."""
    outputs = []
    for (sample,) in teacher_rollouts(scorer, records, rollout, num_samples=1):
        bin_index = int(torch.multinomial(sample.probs.float().cpu(), 1))
        outputs.append(list(sample.token_ids) + [scorer.token_ids[bin_index]])
    return outputs


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
        with torch.no_grad():
            outputs = sample_outputs(policy.plain_scorer, recs, cfg.rollout)
            teacher_read = record_suffix_readout(teacher, recs, outputs, mode="teacher")
        policy.model.train()
        read = record_suffix_readout(policy.scorer, recs, outputs, mode="teacher")  # [B, T]
        if not torch.equal(teacher_read.token_mask, read.token_mask):
            raise RuntimeError("teacher and student read different token masks for the same outputs")
        adv = opd_advantages(
            teacher_read.token_logprobs.to(read.token_logprobs), read.token_logprobs.detach()
        )
        loss = opd_loss(adv, read.token_logprobs, read.token_mask)
        with torch.no_grad():
            mask = read.token_mask
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
