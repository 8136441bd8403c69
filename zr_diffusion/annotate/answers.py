"""``zr annotate DIR --import FILE ...``: the page's downloads merged into training records.

Each downloaded file is one annotator's JSONL in the data schema (``data/records.py``), ids
``<image id>-<dimension>``. The import validates every file with ``load_records`` (a bad line is
``file:line: what``), checks that each answer is an image of ``DIR`` with its prompt, and writes one
record per scored (image, dimension): ``score`` with one annotator, ``scores`` (one per file, in
the order given) with several. Image paths in the output are relative to its folder, so
``zr validate-data`` and ``zr train-reward`` read it as it is.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from zr_diffusion.annotate.page import read_sample_records
from zr_diffusion.data import DataError, ScoredRecord, load_records, write_records
from zr_diffusion.rubric import DEFAULT_DIMENSIONS

ANNOTATIONS = "annotations.jsonl"


class ImportSummary(NamedTuple):
    path: Path  # the records written
    annotators: int  # answer files
    records: int  # scored (image, dimension) pairs
    images_scored: int  # images with at least one score
    images: int  # images in DIR
    per_dimension: dict[str, int]  # records per dimension


def _answers(file: Path, samples: dict, dimensions: tuple[str, ...]) -> list[tuple[str, str, float]]:
    """(image id, dimension, score) of each line of one annotator's file."""
    problems, out = [], []
    for r in load_records(file, dimensions=dimensions, check_images=False):
        sample_id = r.id[: -len(r.dimension) - 1] if r.id.endswith("-" + r.dimension) else None
        sample = samples.get(sample_id)
        if sample is None:
            problems.append(
                f"{r.source}: id {r.id!r} is not '<image id>-{r.dimension}' for an image of this folder "
                f"(answers for another folder?)"
            )
        elif r.prompt != sample.prompt or r.image.name != Path(sample.image).name:
            problems.append(
                f"{r.source}: {r.id!r} has prompt {r.prompt!r} / image {r.image.name}, the folder's "
                f"image {sample_id} has {sample.prompt!r} / {Path(sample.image).name}"
            )
        else:
            out.append((sample_id, r.dimension, r.scores[0]))
    if problems:
        raise DataError(problems)
    return out


def import_answers(
    folder: str | Path,
    files: list[str | Path],
    out: str | Path | None = None,
    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS,
) -> ImportSummary:
    """Merge the annotators' ``files`` into scored records of ``folder``'s images (``out``, default
    ``folder/annotations.jsonl``), replacing ``out`` whole."""
    folder = Path(folder)
    out = Path(out) if out is not None else folder / ANNOTATIONS
    samples = {s.id: s for s in read_sample_records(folder)}
    digests: dict[str, Path] = {}
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for file in map(Path, files):
        if not file.is_file():
            raise FileNotFoundError(f"answers file {file} does not exist")
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        if digest in digests:
            raise ValueError(f"{file} is the same file as {digests[digest]}; give each annotator's file once")
        digests[digest] = file
        for sample_id, dim, score in _answers(file, samples, dimensions):
            scores[(sample_id, dim)].append(score)
    records = [
        ScoredRecord(
            id=f"{s.id}-{d}",
            prompt=s.prompt,
            image=s.path.resolve(),
            dimension=d,
            scores=tuple(scores[(s.id, d)]),
        )
        for s in samples.values()
        for d in dimensions
        if (s.id, d) in scores
    ]
    if not records:
        raise DataError([f"{', '.join(map(str, files))}: no scores in the answers"])
    write_records(records, out)
    per_dimension = {d: sum(r.dimension == d for r in records) for d in dimensions}
    scored = len({sid for sid, _ in scores})
    return ImportSummary(out, len(files), len(records), scored, len(samples), per_dimension)
