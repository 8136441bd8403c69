"""Rubric dimensions and the two scoring prompt templates (METHOD.md §1–3).

Teacher template: the model reasons, writes the score marker, then one score token ("Score: 7"; the
score is read where the digit is written, after the marker's space, see ``vlm.readout.marker_variants``).
Student template: the score token comes right after the prompt, with no reasoning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from zr_diffusion.scores import ScoreGrid

SCORE_MARKER = "Score:"


@dataclass(frozen=True)
class Dimension:
    """One rubric dimension: a name used in data and configs, a title, and five level descriptions."""

    name: str
    title: str
    question: str
    levels: tuple[str, str, str, str, str]  # what a 1, 2, 3, 4, 5 looks like

    def rubric_text(self) -> str:
        return "\n".join(f"{i + 1}: {text}" for i, text in enumerate(self.levels))


DIMENSIONS: dict[str, Dimension] = {
    "alignment": Dimension(
        name="alignment",
        title="text-image alignment",
        question="How well does the image show what the prompt asks for?",
        levels=(
            "the image ignores the prompt; the main subject is missing or wrong",
            "the main subject is present but most attributes (colour, count, position) are wrong",
            "the main subject and some attributes match; one clear mismatch remains",
            "everything important matches; only a minor detail differs",
            "every object, attribute, count and relation in the prompt is shown exactly",
        ),
    ),
    "realism": Dimension(
        name="realism",
        title="realism",
        question="How free is the image of generation artefacts such as noise, smears and broken textures?",
        levels=(
            "heavy artefacts cover the image; surfaces are noise or smeared blotches",
            "strong artefacts on the main subject; textures look synthetic",
            "visible artefacts in places; the rest looks clean",
            "small artefacts only on close inspection",
            "clean, consistent textures and edges everywhere",
        ),
    ),
    "aesthetics": Dimension(
        name="aesthetics",
        title="aesthetics",
        question="How good are the composition, contrast and colour harmony?",
        levels=(
            "no composition: the subject is cut off or lost; flat, muddy contrast",
            "awkward framing and weak contrast; clashing colours",
            "acceptable framing and contrast with clear weaknesses",
            "pleasant, balanced composition and good contrast",
            "striking composition, strong contrast and harmonious colours",
        ),
    ),
    "plausibility": Dimension(
        name="plausibility",
        title="physical plausibility",
        question="Is the geometry possible: whole shapes, sensible sizes, objects resting where they can?",
        levels=(
            "impossible geometry everywhere: broken, fused or floating shapes",
            "the main subject is broken or impossible",
            "one clearly implausible shape or placement",
            "plausible with a minor oddity",
            "every shape is whole and every placement is physically possible",
        ),
    ),
}

DEFAULT_DIMENSIONS: tuple[str, ...] = tuple(DIMENSIONS)


def get_dimension(name: str) -> Dimension:
    """The dimension called ``name``; an unknown name is an error listing the valid ones."""
    try:
        return DIMENSIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown rubric dimension {name!r}; valid dimensions: {sorted(DIMENSIONS)}"
        ) from None


def check_dimensions(names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    if not names:
        raise ValueError(f"at least one rubric dimension is needed; valid dimensions: {sorted(DIMENSIONS)}")
    for n in names:
        get_dimension(n)
    if len(set(names)) != len(names):
        raise ValueError(f"rubric dimensions repeat: {list(names)}")
    return names


def _scale_text(grid: ScoreGrid) -> str:
    pairs = ", ".join(f"{tok}={val:g}" for tok, val in zip(grid.tokens, grid.bins))
    return f"Scores run from {grid.s_min:g} to {grid.s_max:g} in steps of {grid.step:g}; write the score as one token: {pairs}."


def _instruction_head(prompt: str, dimension: str, grid: ScoreGrid) -> str:
    dim = get_dimension(dimension)
    return (
        f"Rate the image for {dim.title}. {dim.question}\n"
        f"Rubric:\n{dim.rubric_text()}\n"
        f"{_scale_text(grid)}\n"
        f"Prompt: {prompt}\n"
    )


def student_instruction(prompt: str, dimension: str, grid: ScoreGrid) -> str:
    """Student template: the answer is the score token alone, right after this instruction."""
    return _instruction_head(prompt, dimension, grid) + "Answer with the score token only."


def teacher_instruction(prompt: str, dimension: str, grid: ScoreGrid) -> str:
    """Teacher template: reason about the image first, then write the marker and the score token."""
    return _instruction_head(prompt, dimension, grid) + (
        f"First describe what you see and reason about the rubric, then write '{SCORE_MARKER}', a space "
        f"and the score token."
    )
