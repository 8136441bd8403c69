"""Scored-sample records, their validation, and same-prompt preference pairs (METHOD.md §1, §2, §5).

A record is ``{id, prompt, image, dimension, score | scores[], rationale?}``, one per line of a JSONL
file (or one per row of a Parquet file). ``image`` is a path, relative to the data file's folder
unless absolute. ``score`` is one annotation; ``scores`` are several annotators, aggregated by
dropping the highest and lowest (when there are at least three) and averaging.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zr_diffusion.rubric import DIMENSIONS
from zr_diffusion.scores import OffGridScoreError, ScoreGrid, aggregate_annotators

RECORD_KEYS = ("id", "prompt", "image", "dimension", "score", "scores", "rationale")


@dataclass(frozen=True)
class ScoredRecord:
    """One validated (prompt, image, dimension) sample with its annotation(s)."""

    id: str
    prompt: str
    image: Path
    dimension: str
    scores: tuple[float, ...]
    rationale: str | None = None
    source: str = ""  # "file:line", for messages

    @property
    def score(self) -> float:
        """The annotated score ``ŝ``: the single annotation, or the aggregate of several."""
        return aggregate_annotators(self.scores)

    def to_json(self, base: Path | None = None) -> dict[str, Any]:
        image = (
            str(self.image.relative_to(base))
            if base is not None and self.image.is_relative_to(base)
            else str(self.image)
        )
        out: dict[str, Any] = {
            "id": self.id,
            "prompt": self.prompt,
            "image": image,
            "dimension": self.dimension,
        }
        if len(self.scores) == 1:
            out["score"] = self.scores[0]
        else:
            out["scores"] = list(self.scores)
        if self.rationale is not None:
            out["rationale"] = self.rationale
        return out


@dataclass(frozen=True)
class PreferencePair:
    """Two records of the same prompt and dimension with different scores; ``w`` scored higher."""

    w: ScoredRecord
    l: ScoredRecord  # noqa: E741

    @property
    def gap(self) -> float:
        """``Δŝ_{w,l} = ŝ_w − ŝ_l`` (Eq. 9), always > 0."""
        return self.w.score - self.l.score


class DataError(ValueError):
    """Bad records; ``problems`` lists every one as ``file:line: message``."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        head = "\n  ".join(self.problems[:20])
        more = f"\n  ... and {len(self.problems) - 20} more" if len(self.problems) > 20 else ""
        super().__init__(
            f"{len(self.problems)} bad record(s):\n  {head}{more}\n"
            f"(pass --skip-bad / skip_bad=true to report and skip them instead)"
        )


def _iter_rows(path: Path) -> Iterator[tuple[int, Any]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield i, row
        return
    with path.open() as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as e:
                yield i, e


def _check_image(path: Path) -> str | None:
    if not path.is_file():
        return f"image file {path} does not exist"
    try:
        from PIL import Image

        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for corrupt files
        return f"image file {path} is not a readable image ({type(e).__name__}: {e})"
    return None


def _parse_record(
    row: Any,
    where: str,
    base: Path,
    grid: ScoreGrid,
    dimensions: Sequence[str],
    check_images: bool,
    require_rationale: bool,
) -> ScoredRecord:
    if isinstance(row, json.JSONDecodeError):
        raise ValueError(f"not valid JSON ({row.msg})")
    if not isinstance(row, dict):
        raise ValueError(f"a record must be a JSON object, got {type(row).__name__}")
    row = {k: v for k, v in row.items() if v is not None}
    unknown = sorted(set(row) - set(RECORD_KEYS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; valid fields: {list(RECORD_KEYS)}")
    for key in ("id", "prompt", "image", "dimension"):
        if key not in row:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(row[key], (str, int)) or (key != "id" and not isinstance(row[key], str)):
            raise ValueError(f"field {key!r} must be a string, got {row[key]!r}")
    if row["dimension"] not in dimensions:
        raise ValueError(f"unknown dimension {row['dimension']!r}; valid dimensions: {list(dimensions)}")
    if ("score" in row) == ("scores" in row):
        raise ValueError("give exactly one of 'score' (one annotation) or 'scores' (a list of annotators)")
    raw = [row["score"]] if "score" in row else row["scores"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"'scores' must be a non-empty list, got {row['scores']!r}")
    try:
        scores = tuple(grid.check(s, where="") for s in raw)
    except OffGridScoreError as e:
        raise ValueError(str(e)) from None
    rationale = row.get("rationale")
    if rationale is not None and not isinstance(rationale, str):
        raise ValueError(f"field 'rationale' must be a string, got {rationale!r}")
    if require_rationale and not rationale:
        raise ValueError("missing field 'rationale' (this method trains on the post-hoc rationale)")
    image = Path(row["image"])
    image = image if image.is_absolute() else base / image
    if check_images and (problem := _check_image(image)):
        raise ValueError(problem)
    return ScoredRecord(
        id=str(row["id"]),
        prompt=row["prompt"],
        image=image,
        dimension=row["dimension"],
        scores=scores,
        rationale=rationale,
        source=where,
    )


def load_records(
    path: str | Path,
    *,
    grid: ScoreGrid | None = None,
    dimensions: Sequence[str] | None = None,
    skip_bad: bool = False,
    check_images: bool = True,
    require_rationale: bool = False,
    log=None,
) -> list[ScoredRecord]:
    """Load and validate records from a ``.jsonl`` or ``.parquet`` file.

    Every problem is reported as ``file:line: message``. By default any bad record stops the load
    (``DataError`` listing all of them); with ``skip_bad`` they are reported and skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist")
    if path.suffix not in (".jsonl", ".parquet"):
        raise DataError([f"{path}: unsupported data file type {path.suffix!r}; use .jsonl or .parquet"])
    grid = grid or ScoreGrid()
    dimensions = tuple(dimensions or DIMENSIONS)
    records: list[ScoredRecord] = []
    problems: list[str] = []
    seen: dict[str, str] = {}
    for line, row in _iter_rows(path):
        where = f"{path}:{line}"
        try:
            rec = _parse_record(row, where, path.parent, grid, dimensions, check_images, require_rationale)
            if rec.id in seen:
                raise ValueError(f"duplicate id {rec.id!r} (first seen at {seen[rec.id]})")
        except ValueError as e:
            problems.append(f"{where}: {e}")
            continue
        seen[rec.id] = where
        records.append(rec)
    if problems:
        if not skip_bad:
            raise DataError(problems)
        log = log or (lambda msg: print(msg, file=sys.stderr))
        for p in problems:
            log(f"skipping bad record: {p}")
    return records


def write_records(records: Iterable[ScoredRecord], path: str | Path) -> None:
    """Write records as JSONL (image paths relative to the file's folder where possible), atomically."""
    from zr_diffusion.io import atomic_write_text

    path = Path(path)
    base = path.parent.resolve()
    lines = [json.dumps(r.to_json(base)) for r in records]
    atomic_write_text(path, "\n".join(lines) + ("\n" if lines else ""))


def build_pairs(records: Iterable[ScoredRecord]) -> list[PreferencePair]:
    """All same-prompt, same-dimension pairs whose scores differ, the higher-scored record as ``w``."""
    groups: dict[tuple[str, str], list[ScoredRecord]] = defaultdict(list)
    for r in records:
        groups[(r.prompt, r.dimension)].append(r)
    pairs = []
    for group in groups.values():
        for a, b in itertools.combinations(group, 2):
            if a.score != b.score:
                pairs.append(PreferencePair(w=a, l=b) if a.score > b.score else PreferencePair(w=b, l=a))
    return pairs


def load_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An RGB image file as a float tensor ``[3, H, W]`` in ``[0, 1]`` (optionally resized to (H, W))."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BICUBIC)
        arr = np.asarray(im, dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def save_image(image: torch.Tensor, path: str | Path) -> None:
    """Save a ``[3, H, W]`` tensor in ``[0, 1]`` as a PNG, atomically."""
    from PIL import Image

    from zr_diffusion.io import atomic_path

    arr = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
