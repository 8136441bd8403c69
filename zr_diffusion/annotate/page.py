"""The annotation page of ``zr annotate DIR``: one self-contained HTML file.

It shows one image at a time, large (a small image is upscaled by a whole factor to at least
``DISPLAY`` pixels, ``image-rendering: pixelated``), its prompt, and per rubric dimension the nine
half-point bins as a grid with the rubric text of each whole level (``zr_diffusion/rubric.py``).
Keys 1-9 give the bins 1.0 … 5.0 (the score tokens' digits), then move on; the script is
``page.js``, its export function ``exportJSONL`` writes the data schema of ``data/records.py``.
Images are embedded as data URIs unless ``link_images`` (then the page must stay in ``DIR``).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import mimetypes
from pathlib import Path
from typing import NamedTuple

from zr_diffusion.data import DataError
from zr_diffusion.io import atomic_write_text
from zr_diffusion.rubric import DEFAULT_DIMENSIONS, check_dimensions, get_dimension
from zr_diffusion.scores import ScoreGrid

PAGE_JS = Path(__file__).with_name("page.js")
DISPLAY = 512  # pixels: smaller images are shown upscaled by a whole factor
RECORDS = "records.jsonl"


class SampleRecord(NamedTuple):
    """One image to annotate: a line of ``DIR/records.jsonl`` as ``zr sample`` writes it."""

    id: str
    prompt: str
    image: str  # as written, relative to DIR
    path: Path  # the file


def read_sample_records(folder: str | Path) -> list[SampleRecord]:
    """The records of ``folder/records.jsonl``; every bad line is reported as ``file:line: what``."""
    path = Path(folder) / RECORDS
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run `zr sample ... --out {folder}` first")
    records, problems, seen = [], [], {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{where}: not valid JSON ({e.msg})")
            continue
        missing = [k for k in ("id", "prompt", "image") if not isinstance(row.get(k), str) or not row[k]]
        if missing:
            problems.append(f"{where}: needs the string field(s) {missing}")
            continue
        file = Path(row["image"]) if Path(row["image"]).is_absolute() else path.parent / row["image"]
        if not file.is_file():
            problems.append(f"{where}: image file {file} does not exist")
        elif row["id"] in seen:
            problems.append(f"{where}: duplicate id {row['id']!r} (first at line {seen[row['id']]})")
        else:
            seen[row["id"]] = number
            records.append(SampleRecord(row["id"], row["prompt"], row["image"], file))
    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{path}: no records"])
    return records


def display_width(width: int, height: int, target: int = DISPLAY) -> int:
    """Width to show an image at: upscaled by the whole factor ``target // max(w, h)`` (at least 1)."""
    return width * max(1, target // max(width, height))


def _item(record: SampleRecord, page_dir: Path, link_images: bool) -> dict:
    from PIL import Image

    with Image.open(record.path) as im:
        width, height = im.size
    if link_images:
        src = Path(record.path).resolve().relative_to(page_dir.resolve()).as_posix()
    else:
        mime = mimetypes.guess_type(record.path.name)[0] or "image/png"
        src = f"data:{mime};base64," + base64.b64encode(record.path.read_bytes()).decode()
    return {
        "id": record.id,
        "prompt": record.prompt,
        "image": record.image,
        "src": src,
        "display": display_width(width, height),
    }


def _dimension_html(d: int, name: str, grid: ScoreGrid) -> str:
    dim = get_dimension(name)
    cells = []
    for i, b in enumerate(grid.bins):
        level = dim.levels[int(b) - 1] if float(b).is_integer() and 1 <= b <= len(dim.levels) else ""
        cells.append(
            f'<button type="button" class="bin {"whole" if level else "half"}" data-dim="{d}" data-bin="{b:g}">'
            f"<b>{b:g}</b> <kbd>{i + 1}</kbd><span>{html.escape(level)}</span></button>"
        )
    columns = " ".join("2fr" if float(b).is_integer() else "1fr" for b in grid.bins)
    return (
        f'<section class="dim" id="dim-{d}"><h3>{html.escape(dim.title)} <span class="value" '
        f'id="value-{d}">–</span></h3><p class="question">{html.escape(dim.question)}</p>'
        f'<div class="bins" style="grid-template-columns:{columns}">{"".join(cells)}</div></section>'
    )


_CSS = """body{font-family:sans-serif;margin:0 auto;padding:0 1em;max-width:1400px}
header{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc;z-index:1}
#bar{height:6px;background:#eee;margin-top:.4em}#bar-fill{height:6px;background:#2a7;width:0}
main{display:flex;gap:1.5em;align-items:flex-start;margin-top:1em}
#view{flex:0 1 auto;max-width:50%;position:sticky;top:6em}
#image{max-width:100%;height:auto;image-rendering:pixelated;border:1px solid #999;display:block}
#prompt{font-size:1.2em;margin:.5em 0}#rubric{flex:1 1 0;min-width:0}
.dim{border:2px solid #ddd;border-radius:6px;padding:.3em .6em;margin-bottom:.6em}
.dim.active{border-color:#27a}.dim h3{margin:.2em 0}.question{margin:.2em 0;color:#444}
.bins{display:grid;gap:3px}.bin{font-size:.75em;text-align:left;vertical-align:top;padding:.3em;
background:#f6f6f6;border:1px solid #ccc;border-radius:4px;cursor:pointer;display:flex;flex-direction:column}
.bin.half{background:#fbfbfb;align-items:center}.bin b{font-size:1.3em}.bin kbd{color:#888}
.bin.chosen{background:#27a;color:#fff;border-color:#27a}.bin.chosen kbd{color:#dde}
.value{float:right;color:#27a}#keys{color:#555;font-size:.85em}"""


def render_page(page: dict, dimensions: tuple[str, ...], grid: ScoreGrid) -> str:
    """The whole page: data as JSON in ``<script id="zr-page">``, then ``page.js``."""
    data = json.dumps(page).replace("</", "<\\/")
    rubric = "\n".join(_dimension_html(d, name, grid) for d, name in enumerate(dimensions))
    n = len(page["items"])
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Annotate {n} images ({page["page_id"]})</title>
<style>{_CSS}</style></head><body>
<header><b>Score each image on each dimension</b> &nbsp; Annotator: <input id="rater" size="14">
<button id="prev" type="button">&larr; previous</button> <button id="next" type="button">next &rarr;</button>
<button id="next-open" type="button">next unscored (n)</button>
<button id="download" type="button">Download annotations (JSONL)</button> &nbsp; <span id="progress"></span>
<div id="keys">Keys: 1&ndash;9 give the bins {grid.bins[0]:g} &hellip; {grid.bins[-1]:g} to the outlined dimension and move on;
&uarr;/&darr; choose the dimension; &larr;/&rarr; change image; n: next image with a score missing; 0 or Backspace
clears. Progress stays in this browser; download the file when done and send it back.</div>
<div id="bar"><div id="bar-fill"></div></div></header>
<main><div id="view"><img id="image" alt="image to score"><div id="prompt"></div><div id="where"></div></div>
<div id="rubric">
{rubric}
</div></main>
<script type="application/json" id="zr-page">{data}</script>
<script>
{PAGE_JS.read_text()}
</script></body></html>
"""


def write_page(
    folder: str | Path,
    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS,
    out: str | Path | None = None,
    link_images: bool = False,
) -> Path:
    """Write the annotation page for ``folder/records.jsonl`` (default ``folder/annotate.html``)."""
    folder = Path(folder)
    dimensions = check_dimensions(dimensions)
    out = Path(out) if out is not None else folder / "annotate.html"
    records = read_sample_records(folder)
    if link_images and not all(r.path.resolve().is_relative_to(out.parent.resolve()) for r in records):
        raise ValueError(f"--link-images: the page {out} must sit in a folder that holds every image")
    grid = ScoreGrid()
    digest = hashlib.sha256(json.dumps([dimensions, [r[:3] for r in records]]).encode())
    for r in records:
        digest.update(r.path.read_bytes())
    page = {
        "format": "zr-annotate/1",
        "page_id": digest.hexdigest()[:16],
        "bins": list(grid.bins),
        "dimensions": [{"name": d} for d in dimensions],
        "items": [_item(r, out.parent, link_images) for r in records],
    }
    atomic_write_text(out, render_page(page, dimensions, grid))
    return out
