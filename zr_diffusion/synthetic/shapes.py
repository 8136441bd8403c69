"""Signed distance functions of the world's shapes, in units of the object radius ``r``.

Every shape is centred at its reference point (0, 0), y points down (image rows), and all shapes
have the same area ``SHAPE_AREA = 0.6·π`` (r = 1) so that a wrong-shape defect leaves the object's
size unchanged and blob areas can be compared with one expected area. Morphing between two shapes
is the linear blend of their SDFs (see :func:`morph_sdf`).
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

SHAPE_AREA = 0.6 * math.pi  # every shape's area in units of r²

_CIRCLE_R = math.sqrt(0.6)  # π R² = 0.6 π
_SQUARE_H = math.sqrt(0.6 * math.pi) / 2  # (2h)² = 0.6 π
_RING_OUT = 0.92
_RING_IN = math.sqrt(_RING_OUT**2 - 0.6)  # π (R_out² − R_in²) = 0.6 π
_STAR_INNER = 0.55  # inner / outer radius of the five-pointed star


def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], -1)


def _scale_to_area(poly: np.ndarray) -> np.ndarray:
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return poly * math.sqrt(SHAPE_AREA / area)


def _star() -> np.ndarray:
    outer, inner = _regular(5, 1.0), _regular(5, _STAR_INNER, -math.pi / 2 + math.pi / 5)
    return np.stack([outer, inner], 1).reshape(10, 2)


def _cross(w: float = 0.27) -> np.ndarray:
    a = 1.0
    pts = [(w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w)]
    return np.array([*pts, (-w, -w), (-w, -a)], dtype=np.float64)


_POLYGONS: dict[str, np.ndarray] = {
    "triangle": _scale_to_area(_regular(3, 1.0)),  # tip up
    "diamond": _scale_to_area(_regular(4, 1.0)),
    "star": _scale_to_area(_star()),
    "cross": _scale_to_area(_cross()),
}

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "ring", "cross", "star")


def polygon_sdf(poly: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Exact signed distance to a simple polygon ``[N, 2]`` (negative inside), vectorised over points."""
    d = np.full(x.shape, np.inf)
    sign = np.ones(x.shape)
    n = len(poly)
    for i in range(n):
        (ax, ay), (bx, by) = poly[i], poly[i - 1]
        ex, ey = bx - ax, by - ay
        wx, wy = x - ax, y - ay
        t = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d = np.minimum(d, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        c1, c2, c3 = y >= ay, y < by, ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = np.where(flip, -sign, sign)
    return sign * np.sqrt(d)


def shape_sdf(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Signed distance (units of r, negative inside) of shape ``kind`` at points ``x, y``."""
    if kind == "circle":
        return np.hypot(x, y) - _CIRCLE_R
    if kind == "ring":
        mid, half = (_RING_OUT + _RING_IN) / 2, (_RING_OUT - _RING_IN) / 2
        return np.abs(np.hypot(x, y) - mid) - half
    if kind == "square":
        dx, dy = np.abs(x) - _SQUARE_H, np.abs(y) - _SQUARE_H
        return np.hypot(np.maximum(dx, 0), np.maximum(dy, 0)) + np.minimum(np.maximum(dx, dy), 0)
    if kind in _POLYGONS:
        return polygon_sdf(_POLYGONS[kind], x, y)
    raise ValueError(f"unknown shape {kind!r}; valid shapes: {list(SHAPES)}")


def morph_sdf(a: str, b: str, t: float, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``(1 − t)·sdf_a + t·sdf_b``: shape ``a`` at t = 0, shape ``b`` at t = 1."""
    if t <= 0 or a == b:
        return shape_sdf(a, x, y)
    if t >= 1:
        return shape_sdf(b, x, y)
    return (1 - t) * shape_sdf(a, x, y) + t * shape_sdf(b, x, y)


@cache
def shape_bbox(kind: str) -> tuple[float, float, float, float]:
    """Bounding box ``(x_min, x_max, y_min, y_max)`` of a shape around its reference point (units of r)."""
    g = np.linspace(-1.5, 1.5, 601)
    x, y = np.meshgrid(g, g)
    inside = shape_sdf(kind, x, y) <= 0
    return float(x[inside].min()), float(x[inside].max()), float(y[inside].min()), float(y[inside].max())


def coverage(sdf: np.ndarray, pixel: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance given in pixels-per-unit ``pixel``."""
    return np.clip(0.5 - sdf * pixel, 0.0, 1.0)
