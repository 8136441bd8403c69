"""The chunked LM-head readout (issue 11 §5): same values and gradients as the full ``[N, T, V]``
logits path, and a graph that keeps hidden states instead of logits."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._vlm_fixtures import FAMILIES, tiny_vlm_dir  # noqa: E402
from zr_diffusion.pipelines.memory import SavedTensorMeter  # noqa: E402
from zr_diffusion.vlm.loading import load_vlm  # noqa: E402
from zr_diffusion.vlm.logprobs import selected_logits  # noqa: E402
from zr_diffusion.vlm.readout import SuffixReadout, VLMScorer  # noqa: E402

PROMPTS = ["a red circle", "two green triangles next to a yellow star"]


def _full_path(head, hidden, ids):
    logits = head(hidden).float()  # [..., V]
    return logits.gather(-1, ids), torch.logsumexp(logits, -1)


@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_selected_logits_matches_full_logits_values_and_gradients(chunk):
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(3, 7, 8, requires_grad=True)
    ids = torch.randint(0, 50, (3, 7, 2))
    weights = torch.randn(3, 7, 2), torch.randn(3, 7)

    def run(fn):
        head.zero_grad()
        hidden.grad = None
        z, lse = fn(head, hidden, ids)
        ((z * weights[0]).sum() + (lse * weights[1]).sum()).backward()
        return z.detach(), lse.detach(), hidden.grad.clone(), head.weight.grad.clone()

    want = run(_full_path)
    got = run(lambda h, x, i: selected_logits(h, x, i, chunk_size=chunk))
    for w, g in zip(want, got):
        assert g.shape == w.shape
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-5)


def test_selected_logits_graph_keeps_hidden_states_not_logits():
    """Full path: autograd keeps the [M, V] fp32 logits (logsumexp's input). Chunked: only the
    checkpointed chunks' inputs (the hidden states, already in the graph) and the small outputs."""
    torch.manual_seed(0)
    m, h, v = 64, 16, 4096
    head = torch.nn.Linear(h, v, bias=False)
    hidden = torch.randn(m, h, requires_grad=True)
    ids = torch.randint(0, v, (m, 1))
    with SavedTensorMeter(head.parameters()) as full:
        _full_path(head, hidden, ids)
    with SavedTensorMeter(head.parameters()) as chunked:
        selected_logits(head, hidden, ids, chunk_size=16)
    assert full.bytes >= m * v * 4
    assert chunked.bytes < m * h * 4 + 4 * m * 16  # hidden + ids + per-row scalars, no logits


def _reference_readout(scorer, feats, prompts, dims, suffixes):
    """What suffix_readout computed before issue 11: full logits over the last T + 1 positions."""
    batch = scorer.inputs.batch(prompts, dims, feats.size, "teacher", suffixes=suffixes)
    t = int(batch.suffix_lengths.max())
    logits = scorer.forward_logits(feats, batch, logits_to_keep=t + 1).float()  # [N, T+1, V]
    log_norm = torch.logsumexp(logits, -1)
    targets = batch.input_ids[:, -t:]
    mask = torch.arange(t).unsqueeze(0) >= (t - batch.suffix_lengths).unsqueeze(1)
    token = (logits[:, :t].gather(-1, targets.unsqueeze(-1)).squeeze(-1) - log_norm[:, :t]) * mask
    score = logits[:, -1, scorer.token_ids]
    return SuffixReadout(token, mask, score, score - log_norm[:, -1:])


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_readout_equals_full_logits_path_values_and_gradients(family):
    """Full fine-tuning of a tiny VLM (every weight, the LM head included, requires grad): the
    chunked readout (2 positions per chunk) gives the old path's values and parameter gradients."""
    vlm, processor = load_vlm(str(tiny_vlm_dir(family)), dtype="float32")
    vlm.train()
    scorer = VLMScorer(vlm, processor, readout_chunk=2)
    side = 56 if family.startswith("qwen2") else 64
    torch.manual_seed(0)
    with torch.no_grad():
        feats = scorer.encode_images(torch.rand(2, 3, side, side))
    suffixes = [[21, 30, 40, *scorer.marker_ids], list(scorer.marker_ids)]
    dims = ["realism", "alignment"]
    w_tok, w_score = torch.randn(2, 3 + len(scorer.marker_ids)), torch.randn(2, 9)
    params = [p for p in vlm.parameters() if p.requires_grad]

    def grads(read: SuffixReadout):
        vlm.zero_grad()
        loss = (read.token_logprobs * w_tok).sum() + (read.score_logprobs * w_score).sum()
        (loss + read.score_logits.square().mean()).backward()
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]

    want = _reference_readout(scorer, feats, PROMPTS, dims, suffixes)
    want_grads = grads(want)
    got = scorer.suffix_readout(feats, PROMPTS, dims, suffixes)
    got_grads = grads(got)
    assert torch.equal(got.token_mask, want.token_mask)
    for name in ("token_logprobs", "score_logits", "score_logprobs"):
        assert torch.allclose(getattr(got, name), getattr(want, name), atol=1e-5), name
    assert any(p is vlm.lm_head.weight for p in params) and all(g.abs().sum() > 0 for g in want_grads[-3:])
    for g, w in zip(got_grads, want_grads):
        assert torch.allclose(g, w, atol=1e-5, rtol=1e-4)
