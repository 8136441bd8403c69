"""Analytic, non-learned scoring of any image against the scene its prompt asks for.

Generated images are not rendered from a known :class:`Defects`, so the oracle annotators and the
GSB judge score them from pixels: :func:`measure` estimates the severity of every defect kind and
:func:`oracle_scores` combines them per dimension with the same rule as :func:`latent_scores`
(``5 − 4·(1 − Π(1 − ŝ_k))``). On rendered images the scores track the latent scores (Pearson
correlations are measured in tests/test_synthetic_world.py).

Pipeline: estimate the background (median colour) and the object colour (median of the pixels
farthest from it in chroma), project every pixel's chroma difference onto the background→object
axis (``u``: 0 background, 1 object; chroma only, so grey mottling does not read as objects),
threshold ``u > 0.5`` and split the mask into 8-connected blobs. With one object's expected area
``A0 = 0.6·π·r²``: blobs under ``SMALL·A0`` are fragments; two sub-``HALF·A0`` blobs whose centroids
are closer than any two objects of the layout are the halves of one split object; everything else
is ``max(1, round(area / A0))`` objects (so merged neighbours still count).

Some measurements compare against a reference render of the intended scene (analysis by
synthesis): the apparent edge blur of a sharp object depends on its shape, size and the noise, and
blur dims thin objects, so smear and contrast are read relative to a render with the other
measured defects applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import numpy as np
import torch

from zr_diffusion.synthetic.imageops import (
    box_blur,
    dilate,
    gaussian_blur,
    grow_labels,
    hue_distance,
    label_components,
    noise_sigma,
    rgb_to_hue_sat,
)
from zr_diffusion.synthetic.shapes import SHAPE_AREA, SHAPES, coverage, morph_sdf, shape_bbox, shape_sdf
from zr_diffusion.synthetic.world import (
    ANCHORS,
    BLOTCH_STD,
    COLOR_SPREAD,
    COLORS,
    CONTRAST_LOSS,
    CUT_FRACTION,
    DEFECT_KINDS,
    NOISE_STD,
    POSITION_SHIFT,
    RADIUS,
    SMEAR_SIGMA,
    Defects,
    Scene,
    combine_severities,
    group_axis,
    position_offset,
    render_np,
    severity_to_score,
    split_offset,
)

SMALL, HALF = 0.36, 0.72  # fractions of A0: fragment < SMALL <= half < HALF <= object
BORDER_SMALL = 0.12  # a blob cut by the frame is an object from this fraction of A0 on
PAIR_DIST = 2.25  # split halves' centroids are closer than this (units of r); neighbours are 2.5 apart
T_GRID = np.linspace(0.0, 1.0, 11)  # morph amounts tried by the shape fit
SHAPE_PRIOR = 0.02  # IoU a morphed template must gain per unit of t to be preferred over the shape
CHROMA = np.eye(3) - 1.0 / 3.0  # [3, 3] removes the grey (1, 1, 1) component of a colour
# Calibration of raw measurements, fitted on single-defect renders at 32 and 48 px.
NOISE_FLOOR = 0.004  # noise_sigma of a clean render (anti-aliased edges)
SMEAR_GAIN = 1.0  # true blur std / apparent extra edge blur
BLOTCH_GAIN = 1.27  # true mottling std / std left after the oracle's box blur on the background
SPLIT_CAL = (0.082, 0.387)  # apparent half offset (units of r) = 0.082 + 0.387·severity (true 0.12 + 0.40·s)


@dataclass(frozen=True)
class Blob:
    area: int  # pixels of the thresholded mask
    soft_area: float  # Σ u over the blob and its rim: its coverage-weighted area (robust to blur)
    cx: float  # soft centroid, pixels (x along columns)
    cy: float
    border: bool  # touches the image frame
    index: int  # label in Segmentation.labels


@dataclass(frozen=True)
class Part:
    """One object as seen in the image: a whole blob, or the two halves of a split object."""

    blobs: tuple[Blob, ...]

    @property
    def split(self) -> bool:
        return len(self.blobs) == 2

    @property
    def soft_area(self) -> float:
        return sum(b.soft_area for b in self.blobs)

    @property
    def center(self) -> tuple[float, float]:
        w = self.soft_area
        return (
            sum(b.cx * b.soft_area for b in self.blobs) / w,
            sum(b.cy * b.soft_area for b in self.blobs) / w,
        )

    @property
    def border(self) -> bool:
        return any(b.border for b in self.blobs)


@dataclass(frozen=True)
class Segmentation:
    bg: np.ndarray  # [3] background colour (median of background pixels of the raw image)
    obj: np.ndarray  # [3] object colour (median of object core pixels of the raw image)
    u: np.ndarray  # [H, W] position on the background -> object chroma axis (smoothed image)
    mask: np.ndarray  # [H, W] u > 0.5
    labels: np.ndarray  # [H, W] blob labels (0 = none)
    grown: np.ndarray  # [H, W] the labels grown 2 px into the background (each blob's soft rim)
    parts: tuple[Part, ...]  # objects (whole or split)
    fragments: tuple[Blob, ...]
    sigma: float  # smoothing applied before thresholding, pixels

    def part_mask(self, part: Part) -> np.ndarray:
        return np.isin(self.labels, [b.index for b in part.blobs])


def _to_numpy(image) -> np.ndarray:
    """``[3, H, W]`` tensor or array in [0, 1] -> ``[H, W, 3]`` float64."""
    arr = image.detach().float().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 3 or arr.shape[0] != 3 or arr.shape[1] != arr.shape[2] or arr.shape[1] < 16:
        raise ValueError(f"expected a square image [3, H, W] with H >= 16, got shape {tuple(arr.shape)}")
    return arr.transpose(1, 2, 0).astype(np.float64)


def expected_area(size: int) -> float:
    """``A0``: pixels of one object at the world's radius."""
    return SHAPE_AREA * (RADIUS * size) ** 2


def _colours(img: np.ndarray, sm: np.ndarray, noise: float, sigma: float):
    """Background, object colour and ``u [H, W]``; ``None`` when no colour stands out of the noise."""
    residual = noise / (2 * math.sqrt(math.pi) * sigma)  # per-channel noise left after smoothing
    bg = np.median(sm.reshape(-1, 3), 0)
    dist = np.linalg.norm((sm - bg) @ CHROMA, axis=-1)  # [H, W]
    obj = np.median(sm[dist >= 0.6 * np.quantile(dist, 0.995)], 0)
    for refine in (False, True):
        axis = (obj - bg) @ CHROMA
        if float(np.linalg.norm(axis)) < 0.02 + 2.5 * residual:
            return None
        u = ((sm - bg) @ axis) / float(axis @ axis)  # [H, W]
        inside = u[u > 0.5]
        core = u >= max(0.75, float(np.quantile(inside, 0.7))) if inside.size else u > 0.75
        back = u < 0.25
        if refine or core.sum() < 3 or back.sum() < 3:
            return bg, obj, u
        # refine both colours on the raw image (smoothing dims thin objects), then recompute u
        obj, bg = np.median(img[core], 0), np.median(img[back], 0)
    raise AssertionError("unreachable")


def _blobs(u: np.ndarray, labels: np.ndarray, n: int) -> list[Blob]:
    h, w = labels.shape
    grown = grow_labels(labels, 2)  # each blob with its soft rim; rims do not overlap
    out = []
    for i in range(1, n + 1):
        m = labels == i
        ys, xs = np.nonzero(m)
        region = grown == i
        ry, rx = np.nonzero(region)
        weight = np.clip(u[region], 0, 1)
        out.append(
            Blob(
                area=int(m.sum()),
                soft_area=float(weight.sum()),
                cx=float((rx + 0.5) @ weight / weight.sum()),
                cy=float((ry + 0.5) @ weight / weight.sum()),
                border=bool(ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1),
                index=i,
            )
        )
    return out


def _group(blobs: list[Blob], size: int) -> tuple[tuple[Part, ...], tuple[Blob, ...]]:
    """Blobs -> parts (whole objects and split pairs) and fragments."""
    a0, r = expected_area(size), RADIUS * size
    fragments = [b for b in blobs if b.soft_area < (BORDER_SMALL if b.border else SMALL) * a0]
    rest = [b for b in blobs if b not in fragments]
    small = [b for b in rest if b.soft_area < HALF * a0]
    close = sorted(
        (math.hypot(p.cx - q.cx, p.cy - q.cy), i, j)
        for i, p in enumerate(small)
        for j, q in enumerate(small)
        if i < j and math.hypot(p.cx - q.cx, p.cy - q.cy) < PAIR_DIST * r
    )
    used: set[int] = set()
    parts = []
    for _, i, j in close:
        if i not in used and j not in used:
            used |= {i, j}
            parts.append(Part((small[i], small[j])))
    paired = {small[i].index for i in used}
    parts += [Part((b,)) for b in rest if b.index not in paired]
    return tuple(parts), tuple(fragments)


def segment(img: np.ndarray, noise: float) -> Segmentation | None:
    """Objects vs background of ``img [H, W, 3]``; ``None`` when nothing stands out."""
    sigma = 0.6 + 0.6 * min(1.0, noise / NOISE_STD)
    sm = gaussian_blur(img, sigma)  # [H, W, 3]
    found = _colours(img, sm, noise, sigma)
    if found is None:
        return None
    bg, obj, u = found
    mask = u > 0.5
    labels, n = label_components(mask)
    parts, fragments = _group(_blobs(u, labels, n), img.shape[0])
    return Segmentation(bg, obj, u, mask, labels, grow_labels(labels, 2), parts, fragments, sigma)


# ------------------------------------------------------------------------------------ measurements


def _color(seg: Segmentation, scene: Scene) -> float:
    hue, _ = rgb_to_hue_sat(seg.obj)
    return hue_distance(float(hue), COLORS[scene.color]) / 180.0


def _count(seg: Segmentation, scene: Scene, a0: float) -> float:
    n = sum(1 if p.split else max(1, round(p.soft_area / a0)) for p in seg.parts)
    return min(1.0, abs(n - scene.count) / 2)


def _position(seg: Segmentation, scene: Scene, size: int) -> float:
    across = 1 - group_axis(scene.position)
    weights = np.array([p.soft_area for p in seg.parts])
    coord = np.array([p.center[across] for p in seg.parts]) @ weights / weights.sum() / size
    disp = coord - ANCHORS[scene.position][across]
    if scene.position == "center":
        return min(1.0, abs(disp) / POSITION_SHIFT["center"])
    return min(1.0, max(0.0, disp / position_offset(scene.position)))


@dataclass(frozen=True)
class Templates:
    """Every candidate morph (b, t) of one shape, with its geometry in units of r."""

    cands: tuple[tuple[str, float], ...]
    ts: np.ndarray  # [M] morph amounts
    cents: np.ndarray  # [M, 2] centroids
    areas: np.ndarray  # [M]
    boxes: np.ndarray  # [M, 4] x_min, x_max, y_min, y_max


@cache
def _templates(a: str) -> Templates:
    g = np.linspace(-1.6, 1.6, 121)
    x, y = np.meshgrid(g, g)
    da = (g[1] - g[0]) ** 2
    cands = ((a, 0.0), *((b, float(t)) for b in SHAPES if b != a for t in T_GRID[1:]))
    cents, areas, boxes = [], [], []
    for b, t in cands:
        inside = morph_sdf(a, b, t, x, y) <= 0
        areas.append(inside.sum() * da)
        cents.append((x[inside].mean(), y[inside].mean()))
        boxes.append((x[inside].min(), x[inside].max(), y[inside].min(), y[inside].max()))
    ts = np.array([t for _, t in cands])
    return Templates(cands, ts, np.array(cents), np.array(areas), np.array(boxes))


def _morph_stack(a: str, tp: Templates, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """SDF of every candidate morph ``[M, P, Q]`` at its own coordinates ``u, v [M, P, Q]``."""
    sdf = shape_sdf(a, u, v)
    for b in {b for b, _ in tp.cands if b != a}:
        sel = np.array([c == b for c, _ in tp.cands])
        t = tp.ts[sel][:, None, None]
        sdf[sel] = (1 - t) * sdf[sel] + t * shape_sdf(b, u[sel], v[sel])
    return sdf


def _placement(seg: Segmentation, part: Part, tp: Templates):
    """Per candidate: pixels per unit ``r [M]`` and reference points ``(x, y) [K, M]`` to try.

    A whole part fixes the scale by its area and the reference point by its centroid (K = 1). A
    part cut by one edge of the frame keeps the world's radius; along that edge its centroid fixes
    the reference point, across it the far (visible, uncut) side does, tried at five sub-pixel
    offsets since a thresholded pointed tip looks up to a pixel shorter than it is."""
    size = seg.u.shape[0]
    cx, cy = part.center
    if not part.border:
        r = np.sqrt(part.soft_area / tp.areas)
        return r, (cx - tp.cents[:, 0] * r)[None], (cy - tp.cents[:, 1] * r)[None]
    ys, xs = np.nonzero(seg.part_mask(part))
    r = np.full(len(tp.cands), RADIUS * size)
    x_ref, y_ref = cx - tp.cents[:, 0] * r, cy - tp.cents[:, 1] * r
    shifts = np.linspace(-1.0, 1.0, 5)[:, None]  # [K, 1] pixels
    if ys.max() == size - 1:  # cut at the bottom: the top side is whole
        return r, np.broadcast_to(x_ref, (5, len(r))), ys.min() - tp.boxes[:, 2] * r + shifts
    if ys.min() == 0:
        return r, np.broadcast_to(x_ref, (5, len(r))), ys.max() + 1 - tp.boxes[:, 3] * r + shifts
    if xs.max() == size - 1:
        return r, xs.min() - tp.boxes[:, 0] * r + shifts, np.broadcast_to(y_ref, (5, len(r)))
    return r, xs.max() + 1 - tp.boxes[:, 1] * r + shifts, np.broadcast_to(y_ref, (5, len(r)))


def _template_ious(seg, part, scene, tp, patch, gx, gy, r, x_ref, y_ref, blur, split) -> np.ndarray:
    """Soft IoU of every candidate ``[M]`` placed at ``x_ref, y_ref [M]`` with the part's patch."""
    r = r[:, None, None]  # [M, 1, 1] pixels per unit
    u = (gx - x_ref[:, None, None]) / r  # [M, P, Q] template-local coordinates
    v = (gy - y_ref[:, None, None]) / r
    if part.split:
        a, b = part.blobs
        nx, ny = a.cx - b.cx, a.cy - b.cy
        norm = math.hypot(nx, ny)
        nx, ny, d = nx / norm, ny / norm, split_offset(split)
        halves = []
        for s in (1, -1):
            pu, pv = u - s * d * nx, v - s * d * ny
            halves.append(np.maximum(_morph_stack(scene.shape, tp, pu, pv), -s * (pu * nx + pv * ny)))
        sdf = np.minimum(*halves)
    else:
        sdf = _morph_stack(scene.shape, tp, u, v)
    sigma = math.hypot(seg.sigma, blur)  # the oracle's smoothing and the image's own blur
    tmpl = gaussian_blur(coverage(sdf * r, 1.0), sigma, axes=(1, 2))  # [M, P, Q]
    return np.minimum(tmpl, patch).sum((1, 2)) / np.maximum(np.maximum(tmpl, patch).sum((1, 2)), 1e-9)


def _shape_fit(seg: Segmentation, part: Part, scene: Scene, blur: float, split: float) -> float:
    """The morph amount t whose template best overlaps the part (soft IoU, small prior towards 0).

    A split part is compared with templates split the same way (cut normal along the line
    between the halves, offset from the split measurement)."""
    tp = _templates(scene.shape)
    m = np.isin(seg.grown, [b.index for b in part.blobs])
    ys, xs = np.nonzero(m)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    patch = np.where(m, np.clip(seg.u, 0, 1), 0)[y0:y1, x0:x1]  # [P, Q]
    gy, gx = np.mgrid[y0:y1, x0:x1] + 0.5
    r, x_refs, y_refs = _placement(seg, part, tp)
    ious = np.max(
        [
            _template_ious(seg, part, scene, tp, patch, gx, gy, r, x, y, blur, split)
            for x, y in zip(x_refs, y_refs)
        ],
        axis=0,
    )
    return float(tp.ts[np.argmax(ious - SHAPE_PRIOR * tp.ts)])


def _shape(seg: Segmentation, scene: Scene, a0: float, blur: float, split: float) -> float:
    """Median morph amount over the parts that show one object (whole, split, or cut by one edge)."""
    size = seg.u.shape[0]
    fits = []
    for p in seg.parts:
        if p.border:
            ys, xs = np.nonzero(seg.part_mask(p))
            edges = (ys.min() == 0) + (ys.max() == size - 1) + (xs.min() == 0) + (xs.max() == size - 1)
            if edges == 1 and not p.split and p.soft_area < 1.2 * a0:
                fits.append(_shape_fit(seg, p, scene, blur, split))
        elif p.split or HALF * a0 <= p.soft_area < 1.5 * a0:
            fits.append(_shape_fit(seg, p, scene, blur, split))
    return float(np.median(fits)) if fits else 0.0


def _raw_contrast(seg: Segmentation) -> float:
    _, spread = rgb_to_hue_sat(seg.obj)
    return float(np.clip((1 - float(spread) / COLOR_SPREAD) / CONTRAST_LOSS, 0, 1))


def _contrast(seg: Segmentation, scene: Scene, size: int, smear: float) -> float:
    """Loss of object saturation, against a reference blurred like the image (blur mixes thin
    objects with the background and would otherwise read as lost contrast)."""
    _, spread = rgb_to_hue_sat(seg.obj)
    full = COLOR_SPREAD
    if smear > 0:
        ref = render_np(
            replace(scene, background="grey"), Defects(smear=smear), size, np.random.default_rng(0)
        )
        ref_seg = segment(ref, 0.0)
        if ref_seg is not None:
            full = float(rgb_to_hue_sat(ref_seg.obj)[1])
    return float(np.clip((1 - float(spread) / full) / CONTRAST_LOSS, 0, 1))


def _clash(seg: Segmentation) -> float:
    _, obj_spread = rgb_to_hue_sat(seg.obj)
    _, bg_spread = rgb_to_hue_sat(seg.bg)
    return float(np.clip(bg_spread / max(float(obj_spread), 0.05), 0, 1))


def _cutoff(seg: Segmentation, scene: Scene, size: int) -> float:
    """Largest fraction of a part's extent hidden by the frame, over ``CUT_FRACTION``."""
    x_min, x_max, y_min, y_max = shape_bbox(scene.shape)
    r = RADIUS * size
    worst = 0.0
    for part in seg.parts:
        if not part.border:
            continue
        ys, xs = np.nonzero(seg.part_mask(part))
        seen = []
        if ys.min() == 0:
            seen.append((ys.max() + 1, y_max - y_min))
        if ys.max() == size - 1:
            seen.append((size - ys.min(), y_max - y_min))
        if xs.min() == 0:
            seen.append((xs.max() + 1, x_max - x_min))
        if xs.max() == size - 1:
            seen.append((size - xs.min(), x_max - x_min))
        for visible, full in seen:
            worst = max(worst, (full * r - visible) / (CUT_FRACTION * full * r))
    return float(np.clip(worst, 0, 1))


def _noise(noise: float) -> float:
    return float(np.clip((noise - NOISE_FLOOR) / NOISE_STD, 0, 1))


def _blotch(img: np.ndarray, seg: Segmentation | None, noise: float) -> float:
    """Std of the box-blurred grey level over the background, less the noise that survives the blur."""
    size = img.shape[0]
    k = max(1, round(size / 16))
    lum = box_blur(img.mean(-1), k)  # [H, W]
    back = np.ones(lum.shape, bool) if seg is None else ~dilate(seg.u > 0.2, k + 1)
    if back.sum() < 10:
        return 0.0
    var = lum[back].var() - noise**2 / (3 * (2 * k + 1) ** 2)
    return float(np.clip(BLOTCH_GAIN * math.sqrt(max(var, 0.0)) / BLOTCH_STD, 0, 1))


def edge_sigma(seg: Segmentation) -> float | None:
    """Apparent blur std (pixels) of the object edges: a blurred unit step of std σ has a peak slope
    ``1 / (√(2π)·σ)``; the slope is read as the 90th percentile of |∇u| on the boundary of the
    parts (fragments are too small to show a full step)."""
    u = np.clip(seg.u, -0.5, 1.5)
    gx, gy = np.zeros_like(u), np.zeros_like(u)
    gx[:, 1:-1] = (u[:, 2:] - u[:, :-2]) / 2
    gy[1:-1] = (u[2:] - u[:-2]) / 2
    big = np.isin(seg.labels, [b.index for p in seg.parts for b in p.blobs])
    band = dilate(big, 1) & dilate(~seg.mask, 1)
    if band.sum() < 4:
        return None
    g = float(np.quantile(np.hypot(gx, gy)[band], 0.9))
    return 1.0 / (math.sqrt(2 * math.pi) * max(g, 1e-6))


def _smear(seg: Segmentation, scene: Scene, size: int, sharp: Defects) -> float:
    """Extra edge blur over a render of the scene with the ``sharp`` defects measured in the image
    (noise, contrast, split) and no blur, as a fraction of the blur at severity 1."""
    sigma = edge_sigma(seg)
    ref = render_np(replace(scene, background="grey"), sharp, size, np.random.default_rng(0))
    ref_seg = segment(ref, noise_sigma(ref))
    ref_sigma = None if ref_seg is None else edge_sigma(ref_seg)
    if sigma is None or ref_sigma is None:
        return 0.0
    sigma_b = math.sqrt(max(sigma**2 - ref_sigma**2, 0.0)) * SMEAR_GAIN
    return float(np.clip(sigma_b / (SMEAR_SIGMA * size), 0, 1))


def _split(seg: Segmentation, size: int) -> float:
    """From the gap between the halves of split parts (median over parts)."""
    r = RADIUS * size
    offsets = []
    for part in seg.parts:
        if part.split:
            p, q = (np.argwhere(seg.labels == b.index) for b in part.blobs)
            gap = float(np.sqrt(((p[:, None] - q[None]) ** 2).sum(-1)).min()) - 1.0
            offsets.append(gap / r / 2)  # each half's apparent offset, units of r
    if not offsets:
        return 0.0
    return float(np.clip((float(np.median(offsets)) - SPLIT_CAL[0]) / SPLIT_CAL[1], 0.05, 1))


def _fragments(seg: Segmentation) -> float:
    """``ceil(4·s)`` fragments are drawn, so n of them means s in ((n−1)/4, n/4]: report the middle."""
    n = sum(1 for b in seg.fragments if not b.border)
    return float(np.clip((n - 0.5) / 4, 0, 1))


def measure(image, scene: Scene) -> dict[str, float]:
    """Estimated severity in [0, 1] of every defect kind of ``image [3, H, W]`` given its ``scene``.

    An image in which no object colour stands out (or only fragments do) gets every object-based
    kind at severity 1 (and smear, which needs edges, at 0)."""
    img = _to_numpy(image)
    size = img.shape[0]
    noise = noise_sigma(img)
    seg = segment(img, noise)
    out = {"noise": _noise(noise), "blotch": _blotch(img, seg, noise)}
    if seg is None or not seg.parts:
        out.update({k: 1.0 for kinds in DEFECT_KINDS.values() for k in kinds if k not in out})
        out["smear"] = 0.0
        return out
    a0 = expected_area(size)
    split = _split(seg, size)
    smear = _smear(seg, scene, size, Defects(noise=out["noise"], contrast=_raw_contrast(seg), split=split))
    blur = SMEAR_SIGMA * size * smear  # estimated blur std, pixels
    out.update(
        color=_color(seg, scene),
        count=_count(seg, scene, a0),
        position=_position(seg, scene, size),
        shape=_shape(seg, scene, a0, blur, split),
        smear=smear,
        contrast=_contrast(seg, scene, size, smear),
        clash=_clash(seg),
        cutoff=_cutoff(seg, scene, size),
        split=split,
        fragments=_fragments(seg),
    )
    return out


def scores_from_severities(severities: dict[str, float]) -> dict[str, float]:
    """Per-dimension scores from per-kind severities, with the rule of :func:`latent_scores`."""
    return {
        dim: severity_to_score(combine_severities(severities[k] for k in kinds))
        for dim, kinds in DEFECT_KINDS.items()
    }


def oracle_scores(image, scene: Scene) -> dict[str, float]:
    """Score ``image [3, H, W]`` in [0, 1] on the four dimensions (each in [1, 5]) given the intended
    ``scene``, from pixels alone (see the module docstring)."""
    return scores_from_severities(measure(image, scene))
