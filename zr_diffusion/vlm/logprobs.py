"""Logits of chosen tokens and their log-normaliser, without the full-vocabulary logits tensor.

The teacher readout (METHOD.md §2) needs, at each of T output positions, the log-probability of
one token, and at the score position the S score-token logits and their full-vocabulary
log-probs. The plain way, ``lm_head(hidden)`` over all positions, holds ``[N, T, V]`` logits in
float32 (16 sequences x 769 positions x 151,657 tokens x 4 bytes = 7.5 GB), which autograd keeps
for the backward of ``logsumexp`` and doubles with its gradient. Here the LM head is applied to a
chunk of positions at a time and only ``logits[ids]`` and ``logsumexp(logits)`` leave the chunk
(trl's ``selective_log_softmax`` takes the same two quantities row by row, from logits it is given).
Under grad each chunk is checkpointed, so the graph keeps only the chunk's hidden states and backward
recomputes one chunk's logits at a time.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK = 256  # positions per LM-head call: 256 x 151,657 x 4 bytes = 155 MB of logits


def _chunk(
    head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``hidden [M, H], ids [M, J] -> (logits at ids [M, J], logsumexp of the logits [M])``, float32."""
    logits = head(hidden).float()  # [M, V], freed when the chunk returns
    return logits.gather(-1, ids), torch.logsumexp(logits, dim=-1)


def selected_logits(
    head: torch.nn.Module, hidden: torch.Tensor, ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``z = head(hidden)`` read at ``ids``, and ``log Σ_v exp z_v``, ``chunk_size`` positions at a time.

    ``hidden [..., H]`` (final hidden states), ``ids [..., J]`` (vocabulary indices) ->
    ``(z[ids] [..., J], logsumexp(z) [...])`` in float32; ``z[ids] - logsumexp`` are the log-probs.
    Values and gradients equal those of ``lm_head`` over all positions followed by ``gather`` and
    ``logsumexp`` (up to float rounding of the matmul's blocking).
    """
    if chunk_size < 1:
        raise ValueError(f"selected_logits: chunk_size must be >= 1, got {chunk_size}")
    if hidden.shape[:-1] != ids.shape[:-1]:
        raise ValueError(
            f"selected_logits: hidden {tuple(hidden.shape)} and ids {tuple(ids.shape)} must share their "
            f"leading dimensions"
        )
    lead = hidden.shape[:-1]
    flat_h = hidden.reshape(-1, hidden.shape[-1])  # [M, H]
    flat_ids = ids.reshape(-1, ids.shape[-1])  # [M, J]
    needs_graph = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    picked, norms = [], []
    for start in range(0, max(flat_h.shape[0], 1), chunk_size):
        h, i = flat_h[start : start + chunk_size], flat_ids[start : start + chunk_size]
        if needs_graph:
            z, lse = checkpoint(_chunk, head, h, i, use_reentrant=False)
        else:
            z, lse = _chunk(head, h, i)
        picked.append(z)
        norms.append(lse)
    return torch.cat(picked).view(*lead, ids.shape[-1]), torch.cat(norms).view(lead)
