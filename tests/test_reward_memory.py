"""Memory options of the frozen reward inside a reward-gradient step: layer checkpointing of the eval-mode
VLM and the reward's own pixel budget. Both leave the differentiable path exact (values and gradients)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._vlm_fixtures import tiny_vlm_dir  # noqa: E402
from zr_diffusion.pipelines.memory import SavedTensorMeter  # noqa: E402
from zr_diffusion.reward.model import ZRewardModel  # noqa: E402
from zr_diffusion.vlm.preprocess import VisionSpec, resize_images, with_pixel_budget  # noqa: E402

PROMPTS = ["a red circle", "two green triangles next to a yellow star above a blue square"]


def _reward_and_grad(rm: ZRewardModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    x = images.clone().requires_grad_(True)
    with SavedTensorMeter(exclude=list(rm.parameters())) as meter:
        reward = rm(x, PROMPTS).reward  # [B]
    reward.sum().backward()
    return reward.detach(), x.grad, meter.bytes


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_layer_checkpointing_keeps_values_and_image_gradients(family):
    path = tiny_vlm_dir(family)
    plain = ZRewardModel.from_pretrained(path)
    ckpt = ZRewardModel.from_pretrained(path, checkpoint_layers=True)
    config = ckpt.vlm.config
    wrapped = sum(type(m).__name__ == "CheckpointWrapper" for m in ckpt.vlm.modules())
    assert wrapped == config.vision_config.depth + config.text_config.num_hidden_layers
    assert set(ckpt.vlm.state_dict()) == set(plain.vlm.state_dict()), "state-dict keys are unchanged"
    assert not ckpt.vlm.training, "the VLM stays in eval mode (transformers' own switch would not act)"
    side = 56 if family == "qwen2_vl" else 64
    images = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(0))
    r0, g0, kept0 = _reward_and_grad(plain, images)
    r1, g1, kept1 = _reward_and_grad(ckpt, images)
    torch.testing.assert_close(r0, r1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g0, g1, atol=1e-7, rtol=1e-5)
    assert g0.abs().sum() > 0
    assert 0 < kept1 < kept0 / 2, "the graph keeps layer inputs only"


def test_pixel_budget_resizes_on_the_differentiable_path():
    """With ``max_pixels`` the reward equals the default reward of the image resized to that budget, in value
    and in the gradient w.r.t. the full-size image; the vision tower never reads more pixels than the budget."""
    path = tiny_vlm_dir("qwen2_vl")
    budget = 56 * 56
    small = ZRewardModel.from_pretrained(path, max_pixels=budget)
    full = ZRewardModel.from_pretrained(path)
    spec = with_pixel_budget(VisionSpec.from_processor(full.processor), budget)
    images = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    seen: list[int] = []
    handle = small.vlm.model.visual.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    r_small, g_small, _ = _reward_and_grad(small, images)
    handle.remove()
    assert seen == [2 * (56 // 14) ** 2], "two 56x56 images of 14-pixel patches"

    x = images.clone().requires_grad_(True)
    r_ref = full(resize_images(x, spec), PROMPTS).reward
    r_ref.sum().backward()
    torch.testing.assert_close(r_small, r_ref.detach(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_small, x.grad, atol=1e-7, rtol=1e-5)
    r_full, _, _ = _reward_and_grad(full, images)  # 112 px is within the processor's own budget
    assert not torch.allclose(r_full, r_small), "the budget changes what the reward reads"


@pytest.mark.parametrize("max_pixels", [100, 10**6])
def test_pixel_budget_outside_the_processor_budget_is_an_error(max_pixels):
    with pytest.raises(ValueError, match=f"max_pixels={max_pixels} must lie in the processor's pixel budget"):
        ZRewardModel.from_pretrained(tiny_vlm_dir("qwen2_vl"), max_pixels=max_pixels)


def test_t2i_reward_config_rejects_a_non_positive_budget():
    from zr_diffusion.pipelines.config import RewardConfig

    assert RewardConfig(model="m", max_pixels=3136, checkpoint_layers=True).max_pixels == 3136
    with pytest.raises(ValueError, match="reward.max_pixels must be >= 1 or null"):
        RewardConfig(model="m", max_pixels=0)
