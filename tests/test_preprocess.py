"""Differentiable preprocessing vs the real Qwen-VL image processor (tiny processors, no models)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from zr_diffusion.vlm.preprocess import (  # noqa: E402
    VisionSpec,
    from_minus_one_one,
    patchify,
    preprocess_images,
    target_size,
)
from zr_diffusion.vlm.tiny import build_tiny_processor  # noqa: E402

# Qwen2-VL style: patch 14, CLIP mean/std; Qwen3.5 style: patch 16, mean 0.5 / std 0.5
STYLES = ["qwen2_vl", "qwen3_5"]


@pytest.fixture(scope="module", params=STYLES)
def processor(request):
    return build_tiny_processor(request.param)


def _uint8_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Half noise (worst case for resampling), half smooth gradients: ``[n, H, W, 3]`` uint8."""
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    smooth = np.stack([np.sin(xx / 5) * 0.5 + 0.5, np.cos(yy / 7) * 0.5 + 0.5, (xx + yy) / (h + w)], -1)
    noise[n // 2 :] = np.round(smooth * 255).astype(np.uint8)
    return noise


def _both_paths(processor, arrays: np.ndarray):
    ref = processor.image_processor([Image.fromarray(a) for a in arrays], return_tensors="pt")
    x = torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255  # [B, 3, H, W] in [0, 1]
    pixel_values, grid_thw = preprocess_images(x, VisionSpec.from_processor(processor))
    return ref, pixel_values, grid_thw


def _to_pixel_units(diff: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """Undo the per-channel std of a ``[N, C * T * P * P]`` difference: differences in [0, 1] pixel units."""
    std = torch.tensor(spec.image_std).view(1, 3, 1)
    return diff.reshape(diff.shape[0], 3, -1) * std


def test_spec_reads_the_processor(processor):
    spec = VisionSpec.from_processor(processor)
    ip = processor.image_processor
    assert spec.patch_size == ip.patch_size and spec.merge_size == 2 and spec.temporal_patch_size == 2
    assert spec.min_pixels == ip.size["shortest_edge"] and spec.max_pixels == ip.size["longest_edge"]
    assert spec.image_mean == pytest.approx(tuple(ip.image_mean))
    assert spec.image_std == pytest.approx(tuple(ip.image_std))


@pytest.mark.parametrize("cells", [(2, 2), (2, 4), (4, 1), (3, 3)])
def test_on_grid_sizes_match_the_processor_exactly(processor, cells):
    spec = VisionSpec.from_processor(processor)
    h, w = cells[0] * spec.factor, cells[1] * spec.factor
    ref, pixel_values, grid_thw = _both_paths(processor, _uint8_images(2, h, w))
    assert target_size(h, w, spec) == (h, w)
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    assert pixel_values.shape == ref["pixel_values"].shape
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", [(64, 96), (30, 30), (50, 70), (100, 37), (200, 200), (20, 20)])
def test_resized_sizes_match_the_processor_within_uint8_rounding(processor, size):
    """Off-grid sizes are resized; the processor resizes the uint8 image, we resize floats.

    Both use antialiased bicubic in the same order (width pass, clamp, height pass, clamp), so what
    is left is the processor's uint8 rounding after each pass (up to 0.5/255 each, plus its
    fixed-point weights). Measured on noise and smooth images: max 1.08/255, mean 0.30/255 in [0, 1]
    pixel units. Bounds asserted: max 1.5/255, mean 0.5/255. (Without the clamp between passes, noise
    images differ by up to 18/255 at overshooting edges.)
    """
    spec = VisionSpec.from_processor(processor)
    ref, pixel_values, grid_thw = _both_paths(processor, _uint8_images(2, *size))
    assert torch.equal(grid_thw, ref["image_grid_thw"])
    th, tw = target_size(*size, spec)
    assert grid_thw[0].tolist() == [1, th // spec.patch_size, tw // spec.patch_size]
    diff = _to_pixel_units((pixel_values - ref["pixel_values"]).abs(), spec)
    assert diff.max().item() <= 1.5 / 255
    assert diff.mean().item() <= 0.5 / 255


def test_patch_layout_merges_blocks_and_duplicates_frames():
    """A 4x4-patch image with patch value = its (row, col): the first four patches are the top-left
    2x2 merge block in row-major order, and each patch is repeated for both temporal frames."""
    spec = VisionSpec(2, 2, 2, 4, 10**6, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    rows = torch.arange(4).repeat_interleave(2)
    img = (rows.view(-1, 1) * 10 + rows.view(1, -1)).float().expand(1, 3, 8, 8)  # value 10 * r + c
    patches = patchify(img, spec)  # [1, 16, 3 * 2 * 2 * 2]
    first = patches[0, :, 0].tolist()
    assert first[:8] == [0, 1, 10, 11, 2, 3, 12, 13]
    frames = patches[0, 5].view(3, 2, 2, 2)
    assert torch.equal(frames[:, 0], frames[:, 1])


def test_gradients_reach_every_pixel(processor):
    spec = VisionSpec.from_processor(processor)
    x = (0.2 + 0.6 * torch.rand(2, 3, 45, 61)).requires_grad_()  # off grid: resized
    pixel_values, _ = preprocess_images(x, spec)
    (pixel_values * torch.randn_like(pixel_values)).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad != 0).float().mean().item() > 0.99


def test_from_minus_one_one():
    x = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0])
    assert from_minus_one_one(x).tolist() == [0.0, 0.0, 0.5, 1.0, 1.0]


def test_input_errors(processor):
    spec = VisionSpec.from_processor(processor)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        preprocess_images(torch.rand(3, 32, 32), spec)
    with pytest.raises(ValueError, match="float tensor"):
        preprocess_images(torch.zeros(1, 3, 32, 32, dtype=torch.uint8), spec)
    with pytest.raises(ValueError, match="multiple of"):
        patchify(torch.rand(1, 3, spec.factor + 1, spec.factor), spec)


def test_spec_rejects_an_unusual_rescale():
    processor = build_tiny_processor("qwen2_vl")
    processor.image_processor.do_rescale = False
    with pytest.raises(ValueError, match="do_rescale=True"):
        VisionSpec.from_processor(processor)
