"""Small numpy image operations for the synthetic world (no scipy/OpenCV dependency).

Images here are numpy arrays ``[H, W]`` (one channel) or ``[H, W, 3]`` (channels last); the public
world API converts to and from ``torch`` ``[3, H, W]`` at its boundary.
"""

from __future__ import annotations

import numpy as np


def _pad(img: np.ndarray, k: int, axis: int) -> np.ndarray:
    widths = [(0, 0)] * img.ndim
    widths[axis] = (k, k)
    return np.pad(img, widths, mode="edge")


def convolve_1d(img: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Correlate ``img`` with an odd 1-D ``kernel`` along ``axis`` (edge padding, same size)."""
    k = len(kernel) // 2
    padded = _pad(img, k, axis)
    n = img.shape[axis]
    out = np.zeros_like(img, dtype=np.float64)
    for i, w in enumerate(kernel):
        out += w * np.take(padded, np.arange(i, i + n), axis=axis)
    return out


def gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(img: np.ndarray, sigma: float, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """Separable Gaussian blur over two spatial ``axes`` (default: ``[H, W]`` or ``[H, W, C]``)."""
    if sigma <= 0:
        return img.astype(np.float64, copy=True)
    k = gaussian_kernel(sigma)
    return convolve_1d(convolve_1d(img, k, axes[0]), k, axes[1])


def box_blur(img: np.ndarray, radius: int) -> np.ndarray:
    k = np.full(2 * radius + 1, 1.0 / (2 * radius + 1))
    return convolve_1d(convolve_1d(img, k, 0), k, 1)


def noise_sigma(img: np.ndarray) -> float:
    """Robust per-channel std of white noise (Immerkær's Laplacian-difference mask, median form).

    The 3x3 mask [[1,-2,1],[-2,4,-2],[1,-2,1]] cancels constant and linear image content and has an L2
    norm of 6, so on white noise of std σ its response has std 6σ; the median of |response| over all
    pixels (edges are a small minority) gives σ ≈ 1.4826 · median / 6.
    """
    gray = img if img.ndim == 2 else img.transpose(2, 0, 1)  # [C, H, W]
    gray = gray.reshape(-1, *gray.shape[-2:])
    c = gray[:, 1:-1, 1:-1]
    n = gray[:, :-2, 1:-1] + gray[:, 2:, 1:-1] + gray[:, 1:-1, :-2] + gray[:, 1:-1, 2:]
    d = gray[:, :-2, :-2] + gray[:, :-2, 2:] + gray[:, 2:, :-2] + gray[:, 2:, 2:]
    resp = 4 * c - 2 * n + d  # [C, H-2, W-2]
    return float(1.4826 * np.median(np.abs(resp)) / 6.0)


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a boolean ``[H, W]`` mask: labels ``[H, W]`` (0 = off), count.

    Label propagation with pointer jumping: each pixel starts with its own flat index, takes the
    minimum over its neighbours, then jumps to the label of the pixel its label names.
    """
    h, w = mask.shape
    big = h * w
    idx = np.arange(big).reshape(h, w)
    lab = np.where(mask, idx, big)
    while True:
        p = np.pad(lab, 1, constant_values=big)
        m = lab.copy()
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                m = np.minimum(m, p[dy : dy + h, dx : dx + w])
        m = np.where(mask, m, big)
        flat = np.append(m.ravel(), big)
        m = np.where(mask, flat[m], big)  # pointer jumping
        if np.array_equal(m, lab):
            break
        lab = m
    uniq, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(h, w)
    n = int((uniq < big).sum())
    # uniq is sorted so the off value (big) is last; shift component labels to start at 1
    labels = np.where(mask, inv + 1, 0)
    return labels, n


def dilate(mask: np.ndarray, radius: int = 1) -> np.ndarray:
    """Binary dilation with a square ``(2r+1)``-wide structuring element."""
    out = mask.copy()
    h, w = mask.shape
    p = np.pad(mask, radius)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            out |= p[dy : dy + h, dx : dx + w]
    return out


def grow_labels(labels: np.ndarray, steps: int) -> np.ndarray:
    """Grow labelled regions into unlabelled (0) pixels by ``steps`` 8-neighbour rings; a pixel
    reached by several regions in the same step takes the largest label."""
    out = labels.copy()
    h, w = labels.shape
    for _ in range(steps):
        p = np.pad(out, 1)
        best = np.zeros_like(out)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                best = np.maximum(best, p[dy : dy + h, dx : dx + w])
        out = np.where(out == 0, best, out)
    return out


def rgb_to_hue_sat(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and the channel spread ``max − min`` of ``[..., 3]`` colours."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    spread = mx - mn
    safe = np.where(spread > 1e-9, spread, 1.0)
    hue = np.where(mx == r, ((g - b) / safe) % 6, np.where(mx == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return (hue * 60.0) % 360.0, spread


def hsv_to_rgb(hue_deg: float, sat: float, val: float) -> np.ndarray:
    """One HSV colour to RGB ``[3]``."""
    h = (hue_deg % 360.0) / 60.0
    c = val * sat
    x = c * (1 - abs(h % 2 - 1))
    i = int(h) % 6
    rgb = [(c, x, 0), (x, c, 0), (0, c, x), (0, x, c), (x, 0, c), (c, 0, x)][i]
    return np.array(rgb) + (val - c)


def hue_distance(a: float, b: float) -> float:
    """Circular distance of two hues in degrees, in [0, 180]."""
    d = abs(a - b) % 360.0
    return min(d, 360.0 - d)
