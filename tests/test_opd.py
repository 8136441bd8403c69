"""OPD's on-policy outputs (METHOD.md §4, Eq. 18-19): which tokens are in the loss, and the score
token drawn at the rollout temperature (issue 8, item 5)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._vlm_fixtures import tiny_vlm_dir  # noqa: E402
from zr_diffusion.data import ScoredRecord, save_image  # noqa: E402
from zr_diffusion.reward.baselines.opd import sample_outputs, sampled_mask  # noqa: E402
from zr_diffusion.reward.config import RolloutConfig  # noqa: E402
from zr_diffusion.vlm.loading import load_vlm  # noqa: E402
from zr_diffusion.vlm.readout import VLMScorer  # noqa: E402


@pytest.fixture(scope="module")
def scorer():
    vlm, processor = load_vlm(tiny_vlm_dir("qwen2_vl"))
    return VLMScorer(vlm.eval(), processor)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = tmp_path_factory.mktemp("opd")
    torch.manual_seed(0)
    out = []
    for k in range(6):
        path = root / f"{k}.png"
        save_image(torch.rand(3, 56, 56), path)
        out.append(ScoredRecord(f"r{k}", "a red circle", path, "realism", (3.0,)))
    return out


def test_appended_marker_tokens_are_not_in_the_opd_loss(scorer, records):
    """With one token of budget the student writes one reasoning token; the three marker tokens are
    appended for the readout. Only the sampled token and the score token are in the loss mask."""
    torch.manual_seed(1)
    outputs = sample_outputs(
        scorer, records[:2], RolloutConfig(max_new_tokens=1), torch.Generator().manual_seed(0)
    )
    m = len(scorer.marker_ids)
    for out in outputs:
        assert len(out.token_ids) == 1 + m + 1 and out.token_ids[1 : 1 + m] == list(scorer.marker_ids)
        assert out.sampled == [True] + [False] * m + [True]
        assert out.token_ids[-1] in scorer.token_ids
    mask = sampled_mask(outputs, 7)  # right-aligned like suffix_readout, two columns of padding
    assert mask.tolist() == [[False, False, True] + [False] * m + [True]] * 2


def test_opd_score_token_is_drawn_at_the_rollout_temperature(scorer, records):
    """At τ = 0.01 the draw is the arg-max of the score logits after the marker; the tiny model's q is
    near uniform, so drawing at τ = 1 would miss the arg-max on most of the 6 records."""
    rollout = RolloutConfig(max_new_tokens=1, temperature=0.01)
    torch.manual_seed(2)
    outputs = sample_outputs(scorer, records, rollout, torch.Generator().manual_seed(0))
    from zr_diffusion.reward.scoring import record_suffix_readout

    with torch.no_grad():
        read = record_suffix_readout(scorer, records, [o.token_ids[:-1] for o in outputs], mode="teacher")
    best = [scorer.token_ids[i] for i in read.score_logits.argmax(-1).tolist()]
    assert [o.token_ids[-1] for o in outputs] == best
    q = torch.softmax(read.score_logits, -1)
    assert float(q.max(-1).values.max()) < 0.5  # not peaked: τ = 1 would often draw something else


def test_a_sampled_eos_ends_the_reasoning_the_same_way_for_grpo_and_opd(scorer):
    """The model writes one token, then EOS: the EOS is counted as generated (tokens per call) but is
    neither fed back nor sampled-in-the-loss; the marker is appended after the reasoning. GRPO's
    loss mask and OPD's ``sampled`` flags both take ``sampled_length`` from this sample."""
    from zr_diffusion.vlm.reasoning import _eos_ids, generate_reasoning

    word, eos = scorer.tokenizer.convert_tokens_to_ids("6"), _eos_ids(scorer)[0]
    feats = scorer.encode_images(torch.rand(1, 3, 56, 56))
    prompt_length = scorer.inputs.batch(["a red circle"], ["realism"], feats.size, "teacher").input_ids.shape[
        1
    ]

    def force(input_ids, scores):
        out = torch.full_like(scores, -1e9)
        out[:, word if input_ids.shape[1] == prompt_length else eos] = 0
        return out

    (sample,) = generate_reasoning(
        scorer, feats, ["a red circle"], "realism", max_new_tokens=5, logits_processor=[force]
    )[0]
    assert sample.num_generated_tokens == 2 and sample.marker_appended
    assert sample.token_ids == [word, *scorer.marker_ids] and sample.sampled_length == 1
