"""RewardDance-style baseline (METHOD.md §4): a generative reward that writes the score FIRST and a
post-hoc rationale after it, trained by next-token cross-entropy on "score token, rationale, end".

The rationales come from the data (written by a stronger model); a record without one is an error
at start-up naming its ``file:line``. Because the score is the first answer token, it is read at
the first answer position, i.e. exactly the student readout: training-time evaluation (and
``zr eval-reward``) score this model in student mode, one output token, no rationale generated.

Loss: mean over each sequence's answer tokens, then mean over the batch (every record weighs the
same whatever its rationale length, and per-process means average to the global mean).
"""

from __future__ import annotations

import torch

from zr_diffusion.reward.loop import TrainResult, run_training
from zr_diffusion.reward.policy import setup_policy
from zr_diffusion.reward.records import load_eval_records, load_train_records
from zr_diffusion.reward.scoring import hpa_eval_fn, record_suffix_readout
from zr_diffusion.training import make_accelerator


def end_of_turn_id(tokenizer) -> int:
    """The id that closes an assistant turn (``<|im_end|>`` on Qwen tokenizers, else eos)."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        return im_end
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither <|im_end|> nor an eos token to end the answer with")
    return int(tokenizer.eos_token_id)


def answer_ids(record, scorer, grid) -> list[int]:
    """``[score token] + "\\n" + rationale + [end of turn]`` as token ids."""
    score = record.score
    idx = grid.bin_index(score, where=f"{record.source}: annotated score (mean of annotators) ")
    rationale = scorer.tokenizer.encode("\n" + record.rationale, add_special_tokens=False)
    return [scorer.token_ids[idx], *rationale, end_of_turn_id(scorer.tokenizer)]


def train_rewarddance(cfg) -> TrainResult:
    accelerator = make_accelerator(cfg.run)
    records = load_train_records(cfg, require_rationale=True)
    eval_records = load_eval_records(cfg)
    grid = cfg.grid.build()
    policy = setup_policy(cfg, accelerator)
    answers = [answer_ids(r, policy.scorer, grid) for r in records]

    def step_fn(step: int, batch: list[int]) -> dict[str, torch.Tensor]:
        recs = [records[i] for i in batch]
        suffixes = [answers[i] for i in batch]
        readout = record_suffix_readout(policy.scorer, recs, suffixes, mode="student")
        logp, mask = readout.token_logprobs, readout.token_mask  # [B, T], right-aligned answers
        per_seq = -(logp * mask).sum(-1) / mask.sum(-1)  # [B]
        lengths = torch.tensor([len(s) for s in suffixes], device=logp.device)
        first = logp.shape[1] - lengths  # [B] column of each answer's score token
        score_nll = -logp.gather(1, first.unsqueeze(1)).squeeze(1)  # [B]
        return {"loss": per_seq.mean(), "score_ce": score_nll.mean().detach()}

    # the score is the first answer token: evaluate in student mode (see the module docstring)
    eval_fn = hpa_eval_fn(eval_records, cfg.data.dimensions, cfg.eval_batch_size, mode="student")
    return run_training(cfg, accelerator, policy, step_fn, eval_fn, num_examples=len(records))
