"""The embedded synthetic world: a prompt grammar, controlled defects with latent true scores, and a
procedural renderer, so that the whole method can run on a CPU against a known ground truth.

A :class:`Scene` is the prompt's attributes (shape, colour, position, count) plus a background tone
that the prompt does not mention. :class:`Defects` holds one severity in [0, 1] per defect kind; each
kind belongs to exactly one rubric dimension (``DEFECT_KINDS``), and the latent score of a dimension
depends only on the severities of its own kinds (:func:`latent_scores`). :func:`render` draws the
scene with the defects applied; ``rng`` only moves nuisance details (small layout jitter, the noise
and blotch patterns, where fragments fall, the angle of a split).

Where the defects are not independent in pixels (the latent scores always are), see
``INDEPENDENCE_NOTES``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.synthetic.imageops import gaussian_blur, hsv_to_rgb
from zr_diffusion.synthetic.shapes import SHAPES, coverage, morph_sdf, shape_bbox

# ------------------------------------------------------------------------------------------ grammar

COLORS: dict[str, float] = {  # name -> HSV hue in degrees; all colours have S = 0.8, V = 0.85
    "red": 0.0,
    "orange": 30.0,
    "yellow": 55.0,
    "green": 120.0,
    "cyan": 185.0,
    "blue": 230.0,
    "purple": 280.0,
    "pink": 325.0,
}
COLOR_SAT, COLOR_VAL = 0.8, 0.85
COLOR_SPREAD = COLOR_VAL * COLOR_SAT  # max − min channel of every palette colour
BACKGROUNDS: dict[str, float] = {"dark": 0.2, "grey": 0.5, "light": 0.8}  # neutral grey level
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
COUNTS: tuple[int, ...] = (1, 2, 3)
MAX_RENDER_COUNT = 5  # a count defect may draw up to two objects more than the prompt asks for
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
PLURALS = {"cross": "crosses"}
POSITION_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}

# Layout, in fractions of the image side. Objects of a "left"/"right" prompt stand in a column,
# the others in a row; five objects need two columns (rows).
ANCHORS = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
RADIUS = 0.12  # object radius r (all shapes have area 0.6·π·r²)
SPACING = 0.30  # centre-to-centre distance along the group axis and between columns
JITTER = 0.02  # uniform group jitter on each axis


def plural(shape: str, count: int) -> str:
    return shape if count == 1 else PLURALS.get(shape, shape + "s")


@dataclass(frozen=True)
class Scene:
    """What a prompt asks for (shape, colour, position, count), and the background tone."""

    shape: str
    color: str
    position: str
    count: int
    background: str = "dark"

    def __post_init__(self) -> None:
        for name, value, valid in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, tuple(COLORS)),
            ("position", self.position, POSITIONS),
            ("count", self.count, COUNTS),
            ("background", self.background, tuple(BACKGROUNDS)),
        ):
            if value not in valid:
                raise ValueError(f"Scene.{name}={value!r} is not one of {list(valid)}")

    @property
    def prompt(self) -> str:
        """e.g. "two red triangles on the left" (the background is not part of the prompt)."""
        noun = plural(self.shape, self.count)
        return f"{COUNT_WORDS[self.count]} {self.color} {noun} {POSITION_PHRASES[self.position]}"


def sample_scene(rng: np.random.Generator) -> Scene:
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=list(COLORS)[rng.integers(len(COLORS))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        count=COUNTS[rng.integers(len(COUNTS))],
        background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
    )


# ------------------------------------------------------------------------------------------ defects

DEFECT_KINDS: dict[str, tuple[str, ...]] = {
    "alignment": ("color", "count", "position", "shape"),
    "realism": ("noise", "blotch", "smear"),
    "aesthetics": ("contrast", "clash", "cutoff"),
    "plausibility": ("split", "fragments"),
}
assert set(DEFECT_KINDS) == set(DIMENSIONS)
KIND_DIMENSION = {k: d for d, kinds in DEFECT_KINDS.items() for k in kinds}

# Strength of each defect at severity 1 (pixel quantities scale with the image side).
HUE_SHIFT = 180.0  # colour: hue rotated by severity · 180°
POSITION_SHIFT = {"side": 0.5, "center": 0.25}  # position: group moved across the image
CUT_FRACTION = 0.55  # cutoff: this fraction·severity of the end object's extent lies outside the frame
NOISE_STD = 0.12  # noise: per-channel Gaussian pixel noise
BLOTCH_STD = 0.08  # blotch: additive grey low-frequency mottling
SMEAR_SIGMA = 0.035  # smear: Gaussian blur std, fraction of the image side
CONTRAST_LOSS = 0.8  # contrast: everything pulled to mid grey, contrast × (1 − 0.8·severity)
SPLIT_GAP = (0.12, 0.40)  # split: each half moved (0.12 + 0.40·severity)·r off the cut
FRAGMENT_RADIUS = 0.4  # fragments: ceil(4·severity) discs of radius 0.4·r (at least 1.5 px)

INDEPENDENCE_NOTES = """\
Latent scores are exactly independent: each dimension's score depends only on its own kinds.
In pixels, and so for oracle_scores, some defects leak into other dimensions' measurements:
- count (alignment): four or five objects stand in two columns, pushed inwards to fit the frame;
  the heavier column and the push move the group's centre by up to ~0.05 of the side (position);
- smear (realism) can merge neighbouring objects across their 1-2 px gaps (count), blur small
  fragments below the threshold (fragments) and, at 32 px, wash thin rings out (contrast, shape);
- noise (realism) makes the edge-blur reading noisier (a false smear of ~0.2 on average);
- contrast (aesthetics) at high severity with strong noise or blotches can hide the objects from
  the segmentation altogether, which then scores every object-based dimension as 1;
- split (plausibility) halves that touch the frame are read as cut off (cutoff) and counted
  as objects (count).
Position is judged across the group's axis only (x for left/right, y otherwise), so a cutoff
that slides the group along its own axis is not a position error.
"""


@dataclass(frozen=True)
class Defects:
    """Defect severities in [0, 1] (0 = absent) and the discrete choices each defect needs.

    ``count_delta`` is the signed number of extra (or missing) objects; its severity is |Δ| / 2.
    ``color_sign``, ``position_sign`` (center prompts only) and ``cutoff_sign`` are ±1 directions;
    ``shape_to`` is the shape that a wrong-shape defect morphs towards.
    """

    color: float = 0.0
    color_sign: int = 1
    count_delta: int = 0
    position: float = 0.0
    position_sign: int = 1
    shape: float = 0.0
    shape_to: str = ""
    noise: float = 0.0
    blotch: float = 0.0
    smear: float = 0.0
    contrast: float = 0.0
    clash: float = 0.0
    cutoff: float = 0.0
    cutoff_sign: int = 1
    split: float = 0.0
    fragments: float = 0.0

    def __post_init__(self) -> None:
        for kind in KIND_DIMENSION:
            if kind != "count" and not 0.0 <= getattr(self, kind) <= 1.0:
                raise ValueError(f"Defects.{kind}={getattr(self, kind)!r} must be a severity in [0, 1]")
        for name in ("color_sign", "position_sign", "cutoff_sign"):
            if getattr(self, name) not in (-1, 1):
                raise ValueError(f"Defects.{name}={getattr(self, name)!r} must be -1 or 1")
        if not -2 <= self.count_delta <= 2:
            raise ValueError(f"Defects.count_delta={self.count_delta} must be in [-2, 2]")
        if self.shape > 0 and self.shape_to not in SHAPES:
            raise ValueError(f"Defects.shape_to={self.shape_to!r} must be one of {list(SHAPES)}")

    def severity(self, kind: str) -> float:
        if kind == "count":
            return min(1.0, abs(self.count_delta) / 2)
        if kind not in KIND_DIMENSION:
            raise ValueError(f"unknown defect kind {kind!r}; valid kinds: {list(KIND_DIMENSION)}")
        return float(getattr(self, kind))

    def active(self) -> dict[str, float]:
        """The defect kinds present (severity > 0) and their severities."""
        return {k: s for k in KIND_DIMENSION if (s := self.severity(k)) > 0}


def combine_severities(severities) -> float:
    """A dimension's severity from its kinds' severities: ``1 − Π_k (1 − s_k)``.

    Equal to ``s`` when one kind is present, monotone in each kind, and at most 1.
    """
    keep = 1.0
    for s in severities:
        keep *= 1.0 - min(max(float(s), 0.0), 1.0)
    return 1.0 - keep


def severity_to_score(severity: float) -> float:
    """``5 − 4·severity``: severity 0 is a perfect 5, severity 1 the worst 1."""
    return 5.0 - 4.0 * severity


def latent_scores(defects: Defects) -> dict[str, float]:
    """The true score in [1, 5] of each dimension: ``5 − 4·(1 − Π_k (1 − s_k))`` over its kinds."""
    return {
        dim: severity_to_score(combine_severities(defects.severity(k) for k in kinds))
        for dim, kinds in DEFECT_KINDS.items()
    }


# ------------------------------------------------------------------------------------------- config


@dataclass
class WorldConfig:
    """Everything that defines one synthetic world and its annotated reward dataset."""

    seed: int = 0  # the whole world (prompts, defects, pixels, annotators) follows from it
    image_size: int = 32  # rendered side in pixels: 32, 48 or 64
    num_prompts: int = 120  # distinct prompts; split by prompt into train / val / test
    images_per_prompt: int = 4  # renders per prompt, each with its own defects (same-prompt pairs)
    val_fraction: float = 0.1  # fraction of prompts in the validation split
    test_fraction: float = 0.2  # fraction of prompts in the test split
    defect_prob: float = 0.6  # chance that a dimension of an image has a defect at all
    second_defect_prob: float = 0.25  # given one, chance of a second defect kind in that dimension
    severity_min: float = 0.1  # severities are drawn uniformly from [severity_min, severity_max]
    severity_max: float = 1.0
    num_annotators: int = 20  # size of the annotator pool (each with a personal bias)
    annotators_per_test_item: int = 5  # K annotations per val/test item (ground truth: trimmed mean)
    annotator_bias_std: float = 0.25  # std of an annotator's personal offset, drawn once
    annotator_noise_std: float = 0.35  # std of per-annotation noise before rounding to the grid
    judge_tie_margin: float = 0.25  # GSB judge: |score difference| below this is "same"
    dimensions: tuple[str, ...] = field(default_factory=lambda: tuple(DIMENSIONS))  # records written

    def __post_init__(self) -> None:
        if self.image_size not in (32, 48, 64):
            raise ValueError(f"image_size must be 32, 48 or 64, got {self.image_size}")
        if self.num_prompts < 3 or self.images_per_prompt < 2:
            raise ValueError(
                f"need num_prompts >= 3 and images_per_prompt >= 2 (for same-prompt pairs), got "
                f"{self.num_prompts} and {self.images_per_prompt}"
            )
        if min(self.val_fraction, self.test_fraction) <= 0 or self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction and test_fraction must be > 0 with a sum < 1, got {self.val_fraction} "
                f"and {self.test_fraction}"
            )
        for name in ("defect_prob", "second_defect_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.severity_min <= self.severity_max <= 1:
            raise ValueError(
                f"need 0 < severity_min <= severity_max <= 1, got {self.severity_min}, {self.severity_max}"
            )
        if not 1 <= self.annotators_per_test_item <= self.num_annotators:
            raise ValueError(
                f"annotators_per_test_item must be in [1, num_annotators={self.num_annotators}], got "
                f"{self.annotators_per_test_item}"
            )
        if self.annotator_bias_std < 0 or self.annotator_noise_std < 0 or self.judge_tie_margin < 0:
            raise ValueError("annotator_bias_std, annotator_noise_std and judge_tie_margin must be >= 0")
        self.dimensions = tuple(self.dimensions)
        unknown = [d for d in self.dimensions if d not in DIMENSIONS]
        if not self.dimensions or unknown:
            raise ValueError(f"dimensions {list(self.dimensions)}: choose from {list(DIMENSIONS)}")


def _sample_kind(kind: str, scene: Scene, severity: float, rng: np.random.Generator) -> dict:
    sign = 1 if rng.random() < 0.5 else -1
    if kind == "count":
        mag = 1 if severity < 0.5 else 2
        feasible = [d for d in (sign * mag, -sign * mag) if 1 <= scene.count + d <= MAX_RENDER_COUNT]
        return {"count_delta": feasible[0]}
    extra = {
        "color": {"color_sign": sign},
        "position": {"position_sign": sign},
        "cutoff": {"cutoff_sign": sign},
        "shape": {"shape_to": str(rng.choice([s for s in SHAPES if s != scene.shape]))},
    }.get(kind, {})
    return {kind: severity, **extra}


def sample_defects(scene: Scene, cfg: WorldConfig, rng: np.random.Generator) -> Defects:
    """Each dimension independently: a defect with ``defect_prob`` (a second kind with
    ``second_defect_prob``), severities uniform in ``[severity_min, severity_max]``."""
    values: dict = {}
    for kinds in DEFECT_KINDS.values():
        if rng.random() >= cfg.defect_prob:
            continue
        n = 2 if rng.random() < cfg.second_defect_prob else 1
        for kind in rng.choice(kinds, size=n, replace=False):
            severity = float(rng.uniform(cfg.severity_min, cfg.severity_max))
            values.update(_sample_kind(str(kind), scene, severity, rng))
    return Defects(**values)


def only(defects: Defects, dimension: str) -> Defects:
    """``defects`` with every kind outside ``dimension`` removed (the discrete choices are kept)."""
    keep = DEFECT_KINDS[dimension]
    reset: dict = {k: 0.0 for k in KIND_DIMENSION if k not in keep and k != "count"}
    if "count" not in keep:
        reset["count_delta"] = 0
    return replace(defects, **reset)


# ----------------------------------------------------------------------------------------- renderer


@dataclass(frozen=True)
class Layout:
    """Object centres ``[N, 2]`` (x, y in fractions of the side) and the radius (fraction)."""

    centers: np.ndarray
    radius: float
    axis: int  # 1: objects along y (a column), 0: along x (a row)


def group_axis(position: str) -> int:
    return 1 if position in ("left", "right") else 0


def layout(scene: Scene, defects: Defects, rng: np.random.Generator) -> Layout:
    """Where the objects go: anchor, count, position shift, jitter, then the cutoff slide."""
    n = scene.count + defects.count_delta
    axis = group_axis(scene.position)
    along_ax, across_ax = axis, 1 - axis
    cols = [n] if n <= 3 else [math.ceil(n / 2), n // 2]
    pts = []
    for c, m in enumerate(cols):
        for i in range(m):
            p = [0.0, 0.0]
            p[along_ax] = (i - (m - 1) / 2) * SPACING
            p[across_ax] = (c - (len(cols) - 1) / 2) * SPACING
            pts.append(p)
    centers = np.array(pts) + np.array(ANCHORS[scene.position])  # [N, 2]
    centers[:, across_ax] += (
        position_offset(scene.position)
        * defects.position
        * (defects.position_sign if scene.position == "center" else 1)
    )
    centers += rng.uniform(-JITTER, JITTER, size=2)
    box = np.array(shape_bbox(scene.shape)).reshape(2, 2) * RADIUS  # [axis, (min, max)]
    spread = split_offset(defects.split) * RADIUS  # split halves move apart across the axis
    lo = centers[:, across_ax].min() + box[across_ax, 0] - spread
    hi = centers[:, across_ax].max() + box[across_ax, 1] + spread
    centers[:, across_ax] += max(0.0, 0.01 - lo) - max(0.0, hi - 0.99)  # keep columns inside
    if defects.cutoff > 0:
        centers[:, along_ax] += _cutoff_slide(centers[:, along_ax], box[along_ax], defects)
    return Layout(centers=centers, radius=RADIUS, axis=axis)


def position_offset(position: str) -> float:
    """Signed shift across the group axis at position severity 1 (towards the opposite side)."""
    return {
        "left": POSITION_SHIFT["side"],
        "right": -POSITION_SHIFT["side"],
        "top": POSITION_SHIFT["side"],
        "bottom": -POSITION_SHIFT["side"],
        "center": POSITION_SHIFT["center"],
    }[position]


def _cutoff_slide(along: np.ndarray, box: np.ndarray, defects: Defects) -> float:
    """Signed slide of the group along its axis that puts ``CUT_FRACTION·severity`` of the end
    object's extent outside the frame."""
    depth = CUT_FRACTION * (box[1] - box[0]) * defects.cutoff
    if defects.cutoff_sign > 0:
        return (1.0 - (along.max() + box[1])) + depth
    return -((along.min() + box[0]) + depth)


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    g = (np.arange(size) + 0.5) / size
    x, y = np.meshgrid(g, g)  # [H, W], x along columns
    return x, y


def object_sdf(scene: Scene, defects: Defects, lay: Layout, size: int, rng) -> np.ndarray:
    """Signed distance in pixels to the union of all (possibly morphed / split) objects: ``[H, W]``."""
    x, y = _pixel_grid(size)
    r = lay.radius
    t = defects.shape
    sdf = np.full((size, size), np.inf)
    for cx, cy in lay.centers:
        u, v = (x - cx) / r, (y - cy) / r  # object-local coordinates, units of r
        if defects.split > 0:
            d = _split_sdf(scene.shape, defects.shape_to, t, u, v, lay.axis, defects.split, rng)
        else:
            d = morph_sdf(scene.shape, defects.shape_to, t, u, v)
        sdf = np.minimum(sdf, d * r * size)
    return sdf


def _split_sdf(a, b, t, u, v, axis, severity, rng) -> np.ndarray:
    """The object cut along a line near the group axis, its halves pushed apart (units of r)."""
    angle = (math.pi / 2 if axis == 1 else 0.0) + rng.uniform(-math.pi / 6, math.pi / 6)
    nx, ny = -math.sin(angle), math.cos(angle)  # normal of the cut line
    delta = split_offset(severity)
    halves = []
    for s in (1, -1):
        pu, pv = u - s * delta * nx, v - s * delta * ny
        halves.append(np.maximum(morph_sdf(a, b, t, pu, pv), -s * (pu * nx + pv * ny)))
    return np.minimum(*halves)


def split_offset(severity: float) -> float:
    """How far (units of r) each half of a split object moves off the cut; 0 without a split."""
    return SPLIT_GAP[0] + SPLIT_GAP[1] * severity if severity > 0 else 0.0


def _fragments_sdf(obj_sdf: np.ndarray, defects: Defects, size: int, rng) -> np.ndarray:
    """Small discs of object colour floating free of the objects and the frame (pixels)."""
    n = math.ceil(4 * defects.fragments - 1e-9)
    rad = max(FRAGMENT_RADIUS * RADIUS * size, 1.5)
    x, y = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5)
    out = np.full((size, size), np.inf)
    placed: list[tuple[float, float]] = []
    margin = rad + 2.0
    for _ in range(60 * n):
        if len(placed) == n:
            break
        px, py = rng.uniform(margin, size - margin, size=2)
        ix, iy = min(int(px), size - 1), min(int(py), size - 1)
        if obj_sdf[iy, ix] < rad + 2.5 or any(
            math.hypot(px - qx, py - qy) < 2 * rad + 2.5 for qx, qy in placed
        ):
            continue
        placed.append((px, py))
        out = np.minimum(out, np.hypot(x - px, y - py) - rad)
    return out


def object_rgb(scene: Scene, defects: Defects) -> np.ndarray:
    """The objects' colour ``[3]``: the prompt's hue, rotated by a colour defect."""
    hue = COLORS[scene.color] + defects.color_sign * HUE_SHIFT * defects.color
    return hsv_to_rgb(hue, COLOR_SAT, COLOR_VAL)


def background_rgb(scene: Scene, defects: Defects) -> np.ndarray:
    """Neutral background, blended towards the objects' complementary colour by a clash defect."""
    hue = COLORS[scene.color] + defects.color_sign * HUE_SHIFT * defects.color
    clash = hsv_to_rgb(hue + 180.0, COLOR_SAT, COLOR_VAL)
    grey = np.full(3, BACKGROUNDS[scene.background])
    return (1 - defects.clash) * grey + defects.clash * clash


def _blotch_field(size: int, rng, cells: int = 6) -> np.ndarray:
    """A smooth random field ``[H, W]`` with zero mean and unit std (bilinear ``cells``² grid)."""
    grid = rng.uniform(-1, 1, size=(cells, cells))
    pos = np.linspace(0, cells - 1, size)
    i0 = np.minimum(pos.astype(int), cells - 2)
    f = pos - i0
    rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # [H, cells]
    field = rows[:, i0] * (1 - f) + rows[:, i0 + 1] * f  # [H, W]
    field -= field.mean()
    return field / max(field.std(), 1e-6)


def render_np(scene: Scene, defects: Defects, size: int = 32, rng=None) -> np.ndarray:
    """:func:`render` as a numpy array ``[H, W, 3]``."""
    if size not in (32, 48, 64):
        raise ValueError(f"size must be 32, 48 or 64, got {size}")
    n = scene.count + defects.count_delta
    if not 1 <= n <= MAX_RENDER_COUNT:
        raise ValueError(
            f"count {scene.count} with count_delta {defects.count_delta} gives {n} objects; "
            f"the renderer draws 1..{MAX_RENDER_COUNT}"
        )
    rng = rng if rng is not None else np.random.default_rng(0)
    lay = layout(scene, defects, rng)
    sdf = object_sdf(scene, defects, lay, size, rng)  # [H, W] pixels
    if defects.fragments > 0:
        sdf = np.minimum(sdf, _fragments_sdf(sdf, defects, size, rng))
    alpha = coverage(sdf, 1.0)[..., None]  # [H, W, 1]
    img = (1 - alpha) * background_rgb(scene, defects) + alpha * object_rgb(scene, defects)
    img = 0.5 + (1 - CONTRAST_LOSS * defects.contrast) * (img - 0.5)
    if defects.smear > 0:
        img = gaussian_blur(img, SMEAR_SIGMA * size * defects.smear)
    if defects.blotch > 0:
        img = img + BLOTCH_STD * defects.blotch * _blotch_field(size, rng)[..., None]
    if defects.noise > 0:
        img = img + rng.normal(0.0, NOISE_STD * defects.noise, size=img.shape)
    return np.clip(img, 0.0, 1.0)


def render(scene: Scene, defects: Defects | None = None, size: int = 32, rng=None) -> torch.Tensor:
    """Render ``scene`` with ``defects``: a float image ``[3, H, W]`` in [0, 1].

    ``rng`` (a ``numpy.random.Generator``) moves only nuisance details; the same generator state
    gives the same pixels.
    """
    img = render_np(scene, defects or Defects(), size, rng)
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1), dtype=np.float32))
