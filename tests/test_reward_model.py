"""ZRewardModel and the VLM readout on saved tiny models: shapes, gradients, one vision pass, padding,
teacher rollouts."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests._vlm_fixtures import FAMILIES, tiny_vlm_dir  # noqa: E402
from zr_diffusion.reward.model import RewardOutput, ZRewardModel  # noqa: E402
from zr_diffusion.rubric import DEFAULT_DIMENSIONS  # noqa: E402
from zr_diffusion.scores import score_distribution  # noqa: E402
from zr_diffusion.vlm.readout import marker_variants  # noqa: E402
from zr_diffusion.vlm.reasoning import find_marker_end, generate_reasoning  # noqa: E402

PROMPTS = ["a red circle", "two green triangles next to a yellow star above a blue square"]


def _side(family: str) -> int:
    return 56 if family.startswith("qwen2") else 64  # 2 x 2 merged tokens, on the processor grid


@pytest.fixture(scope="module")
def reward_model():
    return ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"))


def test_shapes_probs_and_weighted_reward():
    weights = [1.0, 2.0, 0.0, 1.0]
    rm = ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), weights=weights)
    out = rm(torch.rand(2, 3, 56, 56), PROMPTS)
    assert isinstance(out, RewardOutput)
    assert out.mu.shape == (2, 4) and out.probs.shape == (2, 4, 9) and out.reward.shape == (2,)
    assert torch.allclose(out.probs.sum(-1), torch.ones(2, 4))
    assert ((out.mu >= 1) & (out.mu <= 5)).all()
    expected = (out.mu * torch.tensor(weights)).sum(-1) / sum(weights)
    assert torch.allclose(out.reward, expected)
    assert rm.dimensions == DEFAULT_DIMENSIONS


@pytest.mark.parametrize(
    "weights, message",
    [
        ([1.0, 1.0], r"2 weights .* for 4 dimensions"),
        ([1.0, -1.0, 1.0, 1.0], "non-negative"),
        ([0.0, 0.0, 0.0, 0.0], "not all be zero"),
        ([1.0, float("nan"), 1.0, 1.0], "finite"),
    ],
)
def test_invalid_weights_are_errors(weights, message):
    with pytest.raises(ValueError, match=message):
        ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), weights=weights)


def test_prompt_count_and_dimension_errors(reward_model):
    with pytest.raises(ValueError, match="1 prompts for 2 images"):
        reward_model(torch.rand(2, 3, 56, 56), PROMPTS[:1])
    with pytest.raises(ValueError, match="unknown rubric dimension 'beauty'"):
        ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), dimensions=["beauty"])


def test_frozen_even_in_train_mode(reward_model):
    reward_model.train()
    assert not reward_model.vlm.training
    assert not any(m.training for m in reward_model.vlm.modules())
    assert not any(p.requires_grad for p in reward_model.parameters())
    reward_model.eval()


def test_gradients_reach_images_and_no_parameter(reward_model):
    images = torch.rand(2, 3, 50, 70, requires_grad=True)  # off grid: the resize path too
    reward_model(images, PROMPTS).reward.sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all()
    assert images.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward_model.parameters())


def _exact_float64(monkeypatch):
    """transformers upcasts to float32 inside Qwen2-VL's RMSNorm and vision RoPE (harmless in bf16);
    in a float64 model that adds ~1e-7 relative noise, which would swamp finite differences. Swap in
    dtype-preserving copies so the whole forward is float64."""
    from transformers.models.qwen2_vl import modeling_qwen2_vl as mq

    def rms_forward(self, hidden_states):
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))

    def rope_vision(q, k, cos, sin):
        cos, sin = cos.unsqueeze(-2).to(q.dtype), sin.unsqueeze(-2).to(q.dtype)
        return q * cos + mq.rotate_half(q) * sin, k * cos + mq.rotate_half(k) * sin

    monkeypatch.setattr(mq.Qwen2VLRMSNorm, "forward", rms_forward)
    monkeypatch.setattr(mq, "apply_rotary_pos_emb_vision", rope_vision)


def test_gradcheck_dmu_dpixels_float64(monkeypatch):
    """∂μ/∂pixels by autograd equals central finite differences (torch.autograd.gradcheck, float64).

    Pixels vary in a random 3-dimensional subspace around a mid-grey image (x = x0 + Σ z_k A_k), so
    the check covers resizing (30 px -> 28 px), normalisation, patching, the vision tower, the
    scatter into the text, the language model and the softmax / expectation, at 3 + 4 passes' cost.
    """
    _exact_float64(monkeypatch)
    rm = ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    x0 = 0.3 + 0.4 * torch.rand(1, 3, 30, 30, generator=gen, dtype=torch.float64)
    directions = 0.05 * torch.randn(3, 1, 3, 30, 30, generator=gen, dtype=torch.float64)

    def mu_of(z):
        return rm(x0 + torch.einsum("k,kbchw->bchw", z, directions), PROMPTS[:1]).mu  # [1, D]

    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    jacobian = torch.autograd.functional.jacobian(mu_of, z)
    assert jacobian.abs().max() > 1e-5  # a real signal, far above the tolerance below
    assert torch.autograd.gradcheck(mu_of, (z,), eps=1e-6, atol=1e-8, rtol=1e-4)


def test_one_vision_pass_serves_all_dimensions(reward_model):
    calls = []
    visual = reward_model.vlm.model.visual
    handle = visual.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = reward_model(torch.rand(2, 3, 56, 56), PROMPTS)
    finally:
        handle.remove()
    assert len(reward_model.dimensions) == 4 and out.mu.shape == (2, 4)
    assert len(calls) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_equals_per_sample(family):
    """Prompts of different lengths are left-padded; padding must not change any sample's scores
    (Qwen3.5: the linear-attention layers run on the torch fallback on CPU)."""
    rm = ZRewardModel.from_pretrained(tiny_vlm_dir(family))
    side = _side(family)
    images = torch.rand(2, 3, side, side, requires_grad=True)
    batched = rm(images, PROMPTS)
    for b in range(2):
        single = rm(images[b : b + 1].detach(), PROMPTS[b : b + 1])
        assert torch.allclose(batched.probs[b], single.probs[0], atol=1e-6)
        assert torch.allclose(batched.mu[b], single.mu[0], atol=1e-5)
    batched.reward.sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_student_readout_equals_the_processor_path(reward_model):
    """The tensor path (features scattered into the text, own M-RoPE ids) reproduces the model's own
    forward on processor outputs for an on-grid uint8 image."""
    scorer = reward_model.scorer
    image = (torch.rand(1, 3, 56, 56) * 255).round() / 255
    with torch.no_grad():
        ours = scorer(image, PROMPTS[1:], "realism")[0, 0]  # [S]
        text = scorer.inputs.chat_text(PROMPTS[1], "realism", "student")
        pil = Image.fromarray((image[0].permute(1, 2, 0) * 255).round().byte().numpy())
        enc = reward_model.processor(text=[text], images=[pil], return_tensors="pt")
        ref = reward_model.vlm(**enc).logits[0, -1, scorer.token_ids]
    assert torch.allclose(ours, ref, atol=1e-5)


def test_sequence_score_logits_mix_images_and_dimensions(reward_model):
    scorer = reward_model.scorer
    with torch.no_grad():
        feats = scorer.encode_images(torch.rand(2, 3, 56, 56))
        grid = scorer.score_logits(feats, PROMPTS, ["realism", "aesthetics"])  # [2, 2, S]
        mixed = scorer.sequence_score_logits(
            feats, [PROMPTS[1], PROMPTS[0], PROMPTS[1]], ["aesthetics", "realism", "realism"], [1, 0, 1]
        )  # [3, S]
    assert torch.allclose(mixed, torch.stack([grid[1, 1], grid[0, 0], grid[1, 0]]), atol=1e-6)


def test_score_pil_groups_sizes(reward_model):
    images = [
        Image.new("RGB", (56, 56), "red"),
        Image.new("RGB", (84, 56), "blue"),
        Image.new("RGB", (56, 56)),
    ]
    out = reward_model.score_pil(images, ["a", "b", "c"])
    assert out.mu.shape == (3, 4)
    one = reward_model.score_pil(images[1:2], ["b"])
    assert torch.allclose(out.mu[1], one.mu[0])


# ----------------------------------------------------------------------------- teacher mode


@pytest.mark.parametrize("family", FAMILIES)
def test_suffix_readout_matches_generation_logits(family):
    """Greedy generation (KV cache, the model's own M-RoPE bookkeeping) and one suffix_readout
    forward over the generated tokens give the same per-token log-probs and score logits."""
    rm = ZRewardModel.from_pretrained(tiny_vlm_dir(family))
    scorer, model = rm.scorer, rm.vlm
    side = _side(family)
    with torch.no_grad():
        feats = scorer.encode_images(torch.rand(2, 3, side, side))
        batch = scorer.inputs.batch(PROMPTS, ["realism"] * 2, feats.size, "teacher")
        out = model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            mm_token_type_ids=(batch.input_ids == scorer.image_token_id).long(),
            image_grid_thw=feats.grid_thw,
            mm_encoder_outputs={"image": feats.output},
            max_new_tokens=4,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=scorer.inputs.pad_token_id,
        )
        generated = out.sequences[:, batch.input_ids.shape[1] :]  # [2, 4]
        step_logits = torch.stack(out.logits, 1).float()  # [2, 4, V]
        readout = scorer.suffix_readout(feats, PROMPTS, "realism", generated[:, :3].tolist())
    expected = torch.log_softmax(step_logits[:, :3], -1).gather(-1, generated[:, :3, None]).squeeze(-1)
    assert torch.allclose(readout.token_logprobs, expected, atol=1e-5)
    assert torch.allclose(readout.score_logits, step_logits[:, 3, scorer.token_ids], atol=1e-5)


def test_suffix_readout_pads_suffixes_and_keeps_gradients(reward_model):
    scorer = reward_model.scorer
    images = torch.rand(2, 3, 56, 56, requires_grad=True)
    feats = scorer.encode_images(images)
    suffixes = [[21, 30, 40, *scorer.marker_ids], list(scorer.marker_ids)]
    m = len(scorer.marker_ids)  # "Score", ":", " "
    readout = scorer.suffix_readout(feats, PROMPTS, ["realism", "alignment"], suffixes, image_index=[1, 0])
    assert readout.token_logprobs.shape == readout.token_mask.shape == (2, 3 + m)
    assert readout.token_mask.tolist() == [[True] * (3 + m), [False] * 3 + [True] * m]
    assert (readout.token_logprobs[~readout.token_mask] == 0).all()
    assert (readout.token_logprobs[readout.token_mask] < 0).all()
    assert readout.score_logits.shape == readout.score_logprobs.shape == (2, 9)
    assert (readout.score_logprobs < 0).all()
    # each row alone (no padding) gives the same numbers
    single = scorer.suffix_readout(feats, PROMPTS[1:], "alignment", suffixes[1:], image_index=[0])
    assert torch.allclose(single.token_logprobs[0], readout.token_logprobs[1, 3:], atol=1e-6)
    assert torch.allclose(single.score_logits[0], readout.score_logits[1], atol=1e-6)
    (readout.token_logprobs.sum() + readout.score_logprobs.sum()).backward()
    assert (
        torch.isfinite(images.grad).all()
        and images.grad[0].abs().sum() > 0
        and images.grad[1].abs().sum() > 0
    )


def test_generate_reasoning_appends_the_marker_when_the_budget_is_too_small(reward_model):
    scorer = reward_model.scorer
    torch.manual_seed(0)
    records = generate_reasoning(
        scorer, torch.rand(2, 3, 56, 56), PROMPTS, "realism", num_samples=3, max_new_tokens=1
    )
    assert [len(r) for r in records] == [3, 3]
    for b, group in enumerate(records):
        for rec in group:
            assert rec.input_index == b
            assert rec.marker_appended  # the marker is three tokens; one token of budget cannot hold it
            assert rec.num_generated_tokens == 1 and rec.sampled_length == 1
            assert tuple(rec.token_ids[-len(scorer.marker_ids) :]) == scorer.marker_ids
            assert rec.score_logits.shape == (9,) and torch.allclose(rec.probs.sum(), torch.tensor(1.0))
            assert scorer.image_token_id not in rec.token_ids


def test_generate_reasoning_stops_at_a_generated_marker(reward_model):
    """A logits processor forces "6Score: " so that the marker is generated at steps 2-4; sampling
    stops there and q is read right after it, as a direct suffix_readout of the same tokens does."""
    scorer = reward_model.scorer
    forced = [scorer.tokenizer.convert_tokens_to_ids("6"), *scorer.marker_ids]

    def force(input_ids, scores):
        step = input_ids.shape[1] - prompt_length
        out = torch.full_like(scores, -1e9)
        out[:, forced[min(step, len(forced) - 1)]] = 0
        return out

    images = torch.rand(1, 3, 56, 56)
    feats = scorer.encode_images(images)
    prompt_length = scorer.inputs.batch(PROMPTS[:1], ["realism"], feats.size, "teacher").input_ids.shape[1]
    records = generate_reasoning(
        scorer, feats, PROMPTS[:1], "realism", num_samples=2, max_new_tokens=20, logits_processor=[force]
    )
    for rec in records[0]:
        assert not rec.marker_appended
        assert (
            rec.token_ids == forced
            and rec.text == "6"
            and rec.num_generated_tokens == 1 + len(scorer.marker_ids)
        )
        assert rec.sampled_length == 1 + len(scorer.marker_ids) and rec.marker_length == len(
            scorer.marker_ids
        )
        with torch.no_grad():
            ref = scorer.suffix_readout(feats, PROMPTS[:1], "realism", [forced])
        assert torch.allclose(rec.score_logits, ref.score_logits[0], atol=1e-6)
        assert torch.allclose(rec.probs, score_distribution(ref.score_logits[0]))


def test_marker_detection():
    from zr_diffusion.vlm.tiny import build_tiny_tokenizer

    tok = build_tiny_tokenizer("qwen2_vl")
    variants = marker_variants(tok)
    ids = tok.encode("The image is clean. Score: 7", add_special_tokens=False)[:-1]  # up to the digit
    start, end = find_marker_end(ids + [5, 6], variants)
    assert end == len(ids) and tok.decode(ids[start:end]) == " Score: "
    assert tok.decode(ids[end - 1 : end]) == " "  # the marker ends with the space before the digit
    assert find_marker_end(tok.encode("no marker here", add_special_tokens=False), variants) is None
