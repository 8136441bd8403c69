"""The regulariser of ``zr finetune-t2i``: ``mean ‖f_LoRA(x_t, t) − f_base(x_t, t)‖²`` at the same inputs
(``reward_finetune.lora_drift``). Zero at the start, growing as the LoRA moves, and a step on it alone
moves the LoRA back towards the base."""

from __future__ import annotations

import pytest
import torch

from zr_diffusion.pipelines.adapters import ADAPTERS
from zr_diffusion.pipelines.reward_finetune import lora_drift
from zr_diffusion.pipelines.tiny import build_tiny_t2i

PROMPTS = ["a red cube", "a blue sky"]


@pytest.mark.parametrize("family, guidance", [("sd", 5.0), ("zimage", 0.0)])
def test_drift_is_zero_at_the_start_and_grows_with_the_lora(family, guidance):
    adapter = ADAPTERS[family](build_tiny_t2i(family))
    torch.manual_seed(0)
    adapter.add_lora(rank=4, alpha=4.0)
    adapter.set_timesteps(3, 32, 32)
    latents = adapter.initial_latents(2, 32, 32, torch.Generator().manual_seed(1))  # [2, C, h, w]
    lora_b = [p for n, p in adapter.denoiser.named_parameters() if "lora_B" in n]
    direction = [
        torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(lora_b)
    ]

    def drift_at(scale: float) -> torch.Tensor:
        with torch.no_grad():
            for p, d in zip(lora_b, direction):
                p.copy_(scale * d)
        gen = torch.Generator().manual_seed(2)  # the same x_t and step for every scale
        return lora_drift(adapter, latents, PROMPTS, None, guidance, [1, 2], gen)

    start = drift_at(0.0)
    assert start.item() == 0.0  # LoRA B starts at zero: with and without the LoRA are one function
    start.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in adapter.lora_parameters())  # no pull at 0
    for p in adapter.lora_parameters():
        p.grad = None
    values = [drift_at(s).item() for s in (0.01, 0.02, 0.5, 1.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    assert values[1] / values[0] == pytest.approx(4.0, rel=0.05)  # small LoRA: linear effect, quadratic drift

    # a gradient step on the drift alone moves the LoRA back towards the base
    drift = drift_at(1.0)
    drift.backward()
    with torch.no_grad():
        for p in adapter.lora_parameters():
            p -= 0.1 * p.grad / max(float(drift), 1e-12)
    gen = torch.Generator().manual_seed(2)
    after = lora_drift(adapter, latents, PROMPTS, None, guidance, [1, 2], gen).item()
    assert after < drift.item()
