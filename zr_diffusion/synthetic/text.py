"""Ground-truth text from the renderer: what an image shows and what is wrong with it.

:func:`describe` is the perception-pretraining target (the whole image); :func:`rationale` is the
post-hoc rationale of one rubric dimension that the RewardDance-style baseline trains on (METHOD.md
§4: "rationales written by a stronger model, supplied in the data" — here the renderer).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from zr_diffusion.rubric import get_dimension
from zr_diffusion.synthetic.imageops import hue_distance
from zr_diffusion.synthetic.shapes import SHAPES
from zr_diffusion.synthetic.world import (
    COLORS,
    COUNT_WORDS,
    DEFECT_KINDS,
    HUE_SHIFT,
    POSITION_PHRASES,
    Defects,
    Scene,
    plural,
)

OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def degree(severity: float) -> str:
    return "slight" if severity < 1 / 3 else "clear" if severity < 2 / 3 else "severe"


def nearest_color(hue: float) -> str:
    return min(COLORS, key=lambda name: hue_distance(COLORS[name], hue))


def rendered_color(scene: Scene, defects: Defects) -> str:
    return nearest_color(COLORS[scene.color] + defects.color_sign * HUE_SHIFT * defects.color)


def rendered_noun(scene: Scene, defects: Defects, count: int) -> str:
    if defects.shape < 1 / 3:
        return plural(scene.shape, count)
    if defects.shape >= 2 / 3:
        return plural(defects.shape_to, count)
    return f"{plural('shape', count)} halfway between a {scene.shape} and a {defects.shape_to}"


def rendered_position(scene: Scene, defects: Defects) -> str:
    if defects.position < 1 / 3:
        return POSITION_PHRASES[scene.position]
    if scene.position == "center":
        return "towards the " + ("bottom" if defects.position_sign > 0 else "top")
    if defects.position < 2 / 3:
        return "near the middle"
    return POSITION_PHRASES[OPPOSITE[scene.position]]


def contents(scene: Scene, defects: Defects) -> str:
    """e.g. "four orange triangles on the left on a grey background"."""
    n = scene.count + defects.count_delta
    color = rendered_color(scene, defects)
    return (
        f"{COUNT_WORDS[n]} {color} {rendered_noun(scene, defects, n)} "
        f"{rendered_position(scene, defects)} on a {scene.background} background"
    )


def defect_sentence(kind: str, scene: Scene, defects: Defects) -> str:
    """One clause naming defect ``kind`` (present in ``defects``) and how strong it is."""
    s = defects.severity(kind)
    n = scene.count + defects.count_delta
    shapes = plural(scene.shape, scene.count)
    are = "is" if scene.count == 1 else "are"
    sentences = {
        "color": lambda: (
            f"the colour is {rendered_color(scene, defects)} where the prompt asks for {scene.color}"
        ),
        "count": lambda: (
            f"there are {COUNT_WORDS[n]} objects where the prompt asks for {COUNT_WORDS[scene.count]}"
        ),
        "position": lambda: (
            f"the objects sit {rendered_position(scene, defects)} where the prompt asks for "
            f"{POSITION_PHRASES[scene.position]} ({degree(s)} shift)"
        ),
        "shape": lambda: f"the {shapes} {are} {degree(s)}ly deformed towards {plural(defects.shape_to, 2)}",
        "noise": lambda: f"{degree(s)} pixel noise covers the image",
        "blotch": lambda: f"{degree(s)} grey blotches mottle the surfaces",
        "smear": lambda: f"the edges are {degree(s)}ly smeared",
        "contrast": lambda: f"the image is washed out with {degree(s)} loss of contrast",
        "clash": lambda: (
            f"the background is tinted a clashing "
            f"{nearest_color(COLORS[scene.color] + defects.color_sign * HUE_SHIFT * defects.color + 180)} "
            f"({degree(s)})"
        ),
        "cutoff": lambda: f"the end object is cut off by the frame ({degree(s)})",
        "split": lambda: f"every object is split into two separated halves ({degree(s)} gap)",
        "fragments": lambda: (
            f"{COUNT_WORDS.get(math.ceil(4 * s - 1e-9), 'several')} loose fragments float beside the objects"
        ),
    }
    return sentences[kind]()


def _problems(scene: Scene, defects: Defects, kinds) -> list[str]:
    return [defect_sentence(k, scene, defects) for k in kinds if defects.severity(k) > 0]


def describe(scene: Scene, defects: Defects) -> str:
    """What the image shows and every defect it has."""
    kinds = [k for ks in DEFECT_KINDS.values() for k in ks]
    problems = _problems(scene, defects, kinds)
    tail = "; ".join(problems) + "." if problems else "There are no visible defects."
    if problems:
        tail = tail[0].upper() + tail[1:]
    return f"The image shows {contents(scene, defects)}. {tail}"


def rationale(scene: Scene, defects: Defects, dimension: str) -> str:
    """Post-hoc rationale for one rubric dimension: the contents, then that dimension's defects."""
    title = get_dimension(dimension).title
    problems = _problems(scene, defects, DEFECT_KINDS[dimension])
    verdict = "; ".join(problems) if problems else f"nothing lowers the {title}"
    return f"The image shows {contents(scene, defects)}. For {title}: {verdict}."


# --------------------------------------------------------------------------------------------------
# reading a description back (perception accuracy)

# every position phrase :func:`rendered_position` can write
POSITION_WORDS: tuple[tuple[str, ...], ...] = tuple(
    sorted(
        (
            tuple(p.split())
            for p in (*POSITION_PHRASES.values(), "towards the top", "towards the bottom", "near the middle")
        ),
        key=len,
        reverse=True,
    )
)
SINGULARS = {plural(n, 2): n for n in (*SHAPES, "shape")}  # "crosses" -> "cross"


class Contents(NamedTuple):
    """The five attributes of a contents sentence; None where the sentence does not give one."""

    count: str | None
    colour: str | None
    shape: str | None  # the noun phrase in the singular, e.g. "triangle" for "triangles"
    position: str | None
    background: str | None


def singular(noun: str) -> str:
    """ "crosses" -> "cross", "triangles" -> "triangle"; any other word as it is."""
    return SINGULARS.get(noun, noun)


def parse_contents(text: str) -> Contents:
    """Read "<count> <colour> <noun> <position> on a <bg> background" (the form of :func:`contents`).

    The noun may be plural or a phrase ("shapes halfway between a circle and a star"; its first
    word is put in the singular); the position is the longest known phrase (:data:`POSITION_WORDS`)
    that ends the words between the noun and "on a <bg> background". Without a known position
    phrase the noun is the first word alone.
    """
    words = text.split()
    count = words[0] if words else None
    colour = words[1] if len(words) > 1 else None
    background, middle = None, words[2:]
    if len(words) >= 6 and words[-4:-2] == ["on", "a"] and words[-1] == "background":
        background, middle = words[-2], words[2:-4]
    position = next(
        (p for p in POSITION_WORDS if len(middle) > len(p) and middle[-len(p) :] == list(p)), None
    )
    noun = middle[: -len(position)] if position else middle[:1]
    shape = " ".join([singular(noun[0]), *noun[1:]]) if noun else None
    return Contents(count, colour, shape, " ".join(position) if position else None, background)
