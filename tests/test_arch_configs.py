"""configs/arch/*.json build the real architectures: parameter counts equal the published models' (built on
the meta device, so nothing is allocated)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from arch import build_reward, build_t2i, load_arch, parameter_count  # noqa: E402

# Published sizes: SD 1.5 UNet 859.52M, SDXL UNet 2.567B + OpenCLIP bigG text 694.7M, Flux.1 transformer
# 11.90B + T5-XXL encoder 4.762B, Z-Image transformer 6.155B + Qwen3-4B 4.022B, CLIP-L text 123.1M.
T2I = {
    "sd15": {"unet": 859_520_964, "text_encoder": 123_060_480},
    "sdxl": {"unet": 2_567_463_684, "text_encoder_2": 694_659_840},
    "flux1": {"transformer": 11_901_408_320, "text_encoder_2": 4_762_310_656},
    "zimage": {"transformer": 6_154_908_736, "text_encoder": 4_022_468_096},
    "medium": {"unet": 16_821_864},
}
# Qwen2-VL-2B-Instruct: 2,208,985,600 (tied embeddings). Qwen3.5-9B: the value of our file (the transformers
# defaults; not checked against the hub), kept here so that an edit of the file shows.
VLM = {"qwen2_vl_2b": 2_208_985_600, "qwen3_5_9b": 9_409_813_744}


@pytest.mark.parametrize("name", sorted(T2I))
def test_t2i_architectures_have_the_published_sizes(name):
    adapter = build_t2i(name, device="meta")
    for component, count in T2I[name].items():
        assert parameter_count([getattr(adapter.pipe, component)]) == count, component


@pytest.mark.parametrize("name", sorted(VLM))
def test_reward_architectures_have_the_published_sizes(name):
    reward = build_reward(name, device="meta", dtype=torch.bfloat16)
    assert parameter_count([reward.vlm]) == VLM[name]
    assert reward.scorer.spec.max_pixels == load_arch(name)["processor"]["max_pixels"]


def test_unknown_architecture_names_the_valid_ones():
    with pytest.raises(ValueError, match="valid names: .*'sd15'"):
        load_arch("sd14")
