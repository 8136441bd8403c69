"""Differentiable image preprocessing for Qwen-VL vision towers.

The processors' own path (uint8 PIL / tensor -> resize -> rescale and normalise -> patches) is not
differentiable. This module reproduces it on float tensors in ``[0, 1]`` so that reward gradients reach
the pixels: the same smart-resize rule, antialiased bicubic resizing only when the size is off the
processor's grid, the processor's mean / std, and its exact patch layout (each patch duplicated
``temporal_patch_size`` times, patches ordered in ``merge_size x merge_size`` blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class VisionSpec:
    """What the vision tower expects: patch geometry, pixel budget and normalisation."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]

    @property
    def factor(self) -> int:
        """Image sides are multiples of this (one merged vision token covers ``factor x factor`` pixels)."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_processor(cls, processor) -> VisionSpec:
        """Read the spec from a processor (or directly from its image processor)."""
        ip = getattr(processor, "image_processor", processor)
        size = ip.size
        min_pixels = _size_get(size, "shortest_edge", "min_pixels")
        max_pixels = _size_get(size, "longest_edge", "max_pixels")
        if min_pixels is None or max_pixels is None:
            raise ValueError(
                f"image processor size {dict(size)} has no pixel budget; expected keys "
                f"'shortest_edge' (min pixels) and 'longest_edge' (max pixels)"
            )
        if not ip.do_rescale or not math.isclose(ip.rescale_factor, 1 / 255, rel_tol=1e-6):
            raise ValueError(
                f"image processor rescales by {ip.rescale_factor} (do_rescale={ip.do_rescale}); the "
                f"differentiable path takes images in [0, 1] and needs do_rescale=True with factor 1/255"
            )
        mean, std = (ip.image_mean, ip.image_std) if ip.do_normalize else ((0.0,) * 3, (1.0,) * 3)
        return cls(
            patch_size=int(ip.patch_size),
            temporal_patch_size=int(ip.temporal_patch_size),
            merge_size=int(ip.merge_size),
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            image_mean=_triple(mean, "image_mean"),
            image_std=_triple(std, "image_std"),
        )


def with_pixel_budget(spec: VisionSpec, max_pixels: int | None) -> VisionSpec:
    """The spec with a smaller pixel budget: images reach the vision tower with at most ``max_pixels``.

    ``None`` keeps the processor's budget. A budget above the processor's own is an error (the processor
    would read such an image smaller), and so is one below its ``min_pixels``.
    """
    if max_pixels is None:
        return spec
    if not spec.min_pixels <= max_pixels <= spec.max_pixels:
        raise ValueError(
            f"max_pixels={max_pixels} must lie in the processor's pixel budget "
            f"{spec.min_pixels}..{spec.max_pixels} (min_pixels..max_pixels of its image processor)"
        )
    return replace(spec, max_pixels=int(max_pixels))


def _size_get(size, *keys):
    for key in keys:
        value = size.get(key) if hasattr(size, "get") else getattr(size, key, None)
        if value:
            return value
    return None


def _triple(value, name: str) -> tuple[float, float, float]:
    values = [float(value)] * 3 if isinstance(value, (int, float)) else [float(v) for v in value]
    if len(values) != 3:
        raise ValueError(f"{name} must have 3 channel values, got {value!r}")
    return tuple(values)


def target_size(height: int, width: int, spec: VisionSpec) -> tuple[int, int]:
    """The ``(height, width)`` the processor resizes an image to (its own ``smart_resize`` rule)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    return smart_resize(
        height, width, factor=spec.factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels
    )


def from_minus_one_one(x: torch.Tensor) -> torch.Tensor:
    """Map a decoder output in ``[-1, 1]`` to ``[0, 1]`` (clamped, as image decoders' post-processing does)."""
    return ((x + 1) / 2).clamp(0, 1)


def resize_images(images: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """Resize ``[B, C, H, W]`` to the processor's target size; identity when already on its grid.

    Antialiased bicubic, in the order of the processor's uint8 kernel (torchvision on uint8 tensors):
    a width pass, a clamp to the valid range, then a height pass and a clamp. Clamping between the
    passes matters for high-frequency images (bicubic overshoot); only the uint8 roundings of the
    processor are left out, which keeps the path differentiable.
    """
    height, width = images.shape[-2:]
    new_h, new_w = target_size(height, width, spec)
    x = images
    if new_w != width:
        x = F.interpolate(x, size=(height, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    if new_h != height:
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True).clamp(
            0, 1
        )
    return x


def normalize_images(images: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """``(x - mean) / std`` per channel for ``x`` in ``[0, 1]``: ``[B, C, H, W] -> [B, C, H, W]``."""
    mean = torch.tensor(spec.image_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    std = torch.tensor(spec.image_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
    return (images - mean) / std


def patchify(images: torch.Tensor, spec: VisionSpec) -> torch.Tensor:
    """The processor's patch layout: ``[B, C, H, W] -> [B, gh * gw, C * T * P * P]``.

    Patches are ordered by ``merge_size x merge_size`` block (row-major over blocks, then within a
    block); each patch is repeated ``T = temporal_patch_size`` times, as a still image is a clip of T
    identical frames. Flattened features are ordered ``(C, T, P, P)``.
    """
    b, c, h, w = images.shape
    p, m, t = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    gh, gw = h // p, w // p
    if gh * p != h or gw * p != w or gh % m or gw % m:
        raise ValueError(
            f"image size {h}x{w} is not a multiple of patch_size * merge_size = {p * m}; resize it "
            f"first (see target_size)"
        )
    x = images.reshape(b, c, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 2, 5, 3, 6, 1, 4, 7)  # [B, gh/m, gw/m, m, m, C, P, P]
    x = x.unsqueeze(6).expand(-1, -1, -1, -1, -1, -1, t, -1, -1)  # [B, gh/m, gw/m, m, m, C, T, P, P]
    return x.reshape(b, gh * gw, c * t * p * p)


def preprocess_images(images: torch.Tensor, spec: VisionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable processor path for a batch of same-size images in ``[0, 1]``.

    ``images [B, 3, H, W] -> (pixel_values [B * gh * gw, 3 * T * P * P], image_grid_thw [B, 3])``, equal
    to the processor's ``pixel_values`` / ``image_grid_thw`` for on-grid sizes.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    x = normalize_images(resize_images(images, spec), spec)
    b, _, h, w = x.shape
    patches = patchify(x, spec)  # [B, gh * gw, C * T * P * P]
    gh, gw = h // spec.patch_size, w // spec.patch_size
    grid_thw = torch.tensor([[1, gh, gw]] * b, dtype=torch.long, device=images.device)  # [B, 3]
    return patches.reshape(b * gh * gw, -1), grid_thw
