"""GSB (METHOD.md Eq. 21): Good / Same / Bad of a tuned model A against a baseline B.

``GSB = (G − B) / (G + S + B)`` over held-out prompts, each judged once. Two sources of verdicts:

- a judge's scores: ``judge_pairs(scores_a, scores_b, tie_margin)`` then ``gsb(verdicts)``;
- people: ``write_review_page`` writes an offline HTML page of side-by-side pairs (left/right order
  randomised per item from a seed drawn at random unless given, recorded in the key) and, in a separate key file, which side is model A; the page's
  button downloads the answers as JSON, and ``gsb_from_answers(answers, key)`` (``zr gsb --answers
  FILE --key FILE``) maps them back to A/B.

Key file (``zr-gsb-key/1``), kept away from raters::

    {"format": "zr-gsb-key/1", "page_id": "<16 hex>", "seed": 5190419830281767,
     "items": [{"id": "item0000", "prompt": "...", "left": "A"}, ...]}

Answers file (``zr-gsb-answers/1``), as the page's JavaScript writes it; ``null`` or a missing id
means unanswered, counted in ``GSBResult.unanswered``::

    {"format": "zr-gsb-answers/1", "page_id": "<16 hex>", "rater": "", "n_items": 2,
     "answers": {"item0000": "left", "item0001": null}}      # each "left" | "same" | "right" | null
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import random
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, NamedTuple

import torch

Verdict = Literal["G", "S", "B"]
KEY_FORMAT = "zr-gsb-key/1"
ANSWERS_FORMAT = "zr-gsb-answers/1"
CHOICES = ("left", "same", "right")


class GSBResult(NamedTuple):
    good: int
    same: int
    bad: int
    gsb: float  # (G − B) / (G + S + B), in [-1, 1]
    unanswered: int = 0  # items a person left open; not in G + S + B


class AnswersError(ValueError):
    """A malformed answers or key file; the message names the file and the item."""


# ---------------------------------------------------------------- verdicts from scores


def _aggregate(scores, weights: Sequence[float] | None, name: str) -> torch.Tensor:
    """[N] or [N, D] scores -> [N] (weighted mean over D, uniform by default)."""
    s = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
    if s.ndim == 1:
        return s
    if s.ndim != 2:
        raise ValueError(f"{name} must be [N] or [N, D], got shape {tuple(s.shape)}")
    w = torch.ones(s.shape[1], dtype=torch.float64) if weights is None else torch.as_tensor(weights).double()
    if w.shape != (s.shape[1],) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be {s.shape[1]} non-negative values, not all 0; got {weights}")
    return s @ (w / w.sum())  # [N]


def judge_pairs(
    scores_a, scores_b, tie_margin: float = 0.0, weights: Sequence[float] | None = None
) -> list[Verdict]:
    """Per item: "G" if a − b > tie_margin, "B" if b − a > tie_margin, else "S".

    scores_a, scores_b: [N] rewards or [N, D] per-dimension scores (reduced by the weighted mean,
    METHOD.md §6's default aggregation) of the tuned model A and the baseline B on the same prompts.
    """
    if tie_margin < 0:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    a, b = _aggregate(scores_a, weights, "scores_a"), _aggregate(scores_b, weights, "scores_b")
    if a.shape != b.shape:
        raise ValueError(f"scores_a and scores_b differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    d = a - b  # [N]
    return ["G" if x > tie_margin else "B" if x < -tie_margin else "S" for x in d.tolist()]


def gsb(verdicts: Sequence[str], unanswered: int = 0) -> GSBResult:
    """Count verdicts and compute GSB = (G − B) / (G + S + B)."""
    bad_items = [(i, v) for i, v in enumerate(verdicts) if v not in ("G", "S", "B")]
    if bad_items:
        raise ValueError(f"verdicts must be 'G', 'S' or 'B'; got {bad_items[:5]} (index, value)")
    if not verdicts:
        raise ValueError(f"GSB needs at least one verdict, got none ({unanswered} unanswered)")
    g, s, b = (sum(v == k for v in verdicts) for k in ("G", "S", "B"))
    return GSBResult(good=g, same=s, bad=b, gsb=(g - b) / (g + s + b), unanswered=unanswered)


def render_gsb_markdown(result: GSBResult, label_a: str = "tuned", label_b: str = "baseline") -> str:
    """A one-row Markdown table: comparison, G, S, B, total, GSB (and unanswered when any)."""
    total = result.good + result.same + result.bad
    cols = ["comparison", "G", "S", "B", "total", "GSB"]
    row = [f"{label_a} vs {label_b}", result.good, result.same, result.bad, total, f"{result.gsb:+.1%}"]
    if result.unanswered:
        cols.append("unanswered")
        row.append(result.unanswered)
    lines = [
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
        "| " + " | ".join(map(str, row)) + " |",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- review page for people


def _png_bytes(image: torch.Tensor) -> bytes:
    """[3, H, W] in [0, 1] -> PNG file bytes."""
    import numpy as np
    from PIL import Image

    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"each image must be [3, H, W] in [0, 1], got shape {tuple(image.shape)}")
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round()
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


_CSS = """body{font-family:sans-serif;margin:2em auto;max-width:1100px}
.item{border-top:1px solid #ccc;padding:1em 0}.prompt{font-size:1.1em;margin-bottom:.5em}
.pair{display:flex;gap:1em}.pair figure{margin:0;text-align:center;flex:1 1 0;max-width:512px}
.pair img{width:100%;image-rendering:pixelated}
.choice label{margin-right:1.5em}#bar{position:sticky;top:0;background:#fff;padding:.5em 0}"""

# Reads the radio buttons, keeps progress in localStorage (per page id), downloads the answers JSON.
_JS = """const PAGE = __PAGE__;
const storeKey = "zr-gsb-" + PAGE.page_id;
function collect() {
  const answers = {};
  for (const id of PAGE.items) {
    const el = document.querySelector('input[name="' + id + '"]:checked');
    answers[id] = el ? el.value : null;
  }
  return {format: PAGE.format, page_id: PAGE.page_id, n_items: PAGE.items.length,
          rater: document.getElementById("rater").value, answers: answers};
}
function update() {
  const a = collect();
  localStorage.setItem(storeKey, JSON.stringify(a));
  const done = Object.values(a.answers).filter(v => v !== null).length;
  document.getElementById("progress").textContent = done + " of " + PAGE.items.length + " answered";
}
function download() {
  const blob = new Blob([JSON.stringify(collect(), null, 1)], {type: "application/json"});
  const link = document.createElement("a");
  link.href = URL.createObjectURL(blob);
  link.download = "gsb_answers_" + PAGE.page_id + ".json";
  document.body.appendChild(link); link.click(); link.remove();
}
function restore() {
  let saved = null;
  try { saved = JSON.parse(localStorage.getItem(storeKey)); } catch (e) {}
  if (saved && saved.answers) {
    for (const [id, v] of Object.entries(saved.answers)) {
      const el = document.querySelector('input[name="' + id + '"][value="' + v + '"]');
      if (el) el.checked = true;
    }
    document.getElementById("rater").value = saved.rater || "";
  }
  update();
}
document.addEventListener("change", update);
document.getElementById("download").addEventListener("click", download);
restore();"""


def _item_html(item_id: str, prompt: str, left: str, right: str) -> str:
    radios = "".join(
        f'<label><input type="radio" name="{item_id}" value="{v}"> {text}</label>'
        for v, text in zip(CHOICES, ("Left better", "Same", "Right better"))
    )
    return (
        f'<div class="item" id="{item_id}"><div class="prompt"><b>{item_id}</b>: {html.escape(prompt)}</div>'
        f'<div class="pair"><figure><img src="{left}" alt="left"><figcaption>Left</figcaption></figure>'
        f'<figure><img src="{right}" alt="right"><figcaption>Right</figcaption></figure></div>'
        f'<div class="choice">{radios}</div></div>'
    )


def _page_html(page_id: str, items: list[tuple[str, str, str, str]]) -> str:
    page = {"format": ANSWERS_FORMAT, "page_id": page_id, "items": [it[0] for it in items]}
    script = _JS.replace("__PAGE__", json.dumps(page).replace("</", "<\\/"))
    body = "\n".join(_item_html(*it) for it in items)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Side-by-side review {page_id}</title>
<style>{_CSS}</style></head><body>
<h1>Which image fits its prompt better?</h1>
<p>For each prompt, pick the better image or "Same". Progress is kept in this browser; when done,
download the answers and send the file back. Page {page_id}, {len(items)} items.</p>
<div id="bar">Rater: <input id="rater" size="16"> <span id="progress"></span>
<button id="download" type="button">Download answers (JSON)</button></div>
{body}
<script>
{script}
</script></body></html>
"""


def write_review_page(
    out_dir: str | Path,
    prompts: Sequence[str],
    images_a: torch.Tensor | Sequence[torch.Tensor],
    images_b: torch.Tensor | Sequence[torch.Tensor],
    seed: int | None = None,
    key_path: str | Path | None = None,
) -> tuple[Path, Path]:
    """Write ``out_dir/index.html`` + ``out_dir/images/*.png`` and the key JSON; return (html, key).

    images_a / images_b: [N, 3, H, W] in [0, 1] (or N tensors [3, H, W]) from model A (tuned) and B
    (baseline) for the N prompts. seed picks the left/right order; None draws it at random (a fixed
    seed would let raters predict the order); the key file records it. key_path defaults to ``<out_dir>.key.json`` beside the folder, so
    the folder can be handed to raters as it is. Both are written atomically; an existing
    ``out_dir`` is replaced whole.
    """
    from zr_diffusion.io import atomic_write_json, atomic_write_text, write_dir_atomically

    n = len(prompts)
    if n == 0 or len(images_a) != n or len(images_b) != n:
        raise ValueError(
            f"need N >= 1 prompts and N images per model; got {n}, {len(images_a)}, {len(images_b)}"
        )
    out_dir = Path(out_dir)
    key_path = Path(key_path) if key_path is not None else out_dir.with_name(out_dir.name + ".key.json")
    if key_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"key_path {key_path} is inside {out_dir}; keep the key away from raters")
    if seed is None:
        seed = secrets.randbits(63)
    pngs = [(_png_bytes(a), _png_bytes(b)) for a, b in zip(images_a, images_b)]
    digest = hashlib.sha256(json.dumps([seed, list(prompts)]).encode())
    for a, b in pngs:
        digest.update(a + b)
    page_id = digest.hexdigest()[:16]
    rng = random.Random(seed)
    key_items, page_items, sides = [], [], []
    for i, (prompt, (png_a, png_b)) in enumerate(zip(prompts, pngs)):
        item_id, a_left = f"item{i:04d}", rng.random() < 0.5
        key_items.append({"id": item_id, "prompt": prompt, "left": "A" if a_left else "B"})
        page_items.append((item_id, prompt, f"images/{item_id}_L.png", f"images/{item_id}_R.png"))
        sides.append((png_a, png_b) if a_left else (png_b, png_a))  # (left, right)

    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        for (item_id, *_), (left, right) in zip(page_items, sides):
            (tmp / "images" / f"{item_id}_L.png").write_bytes(left)
            (tmp / "images" / f"{item_id}_R.png").write_bytes(right)
        atomic_write_text(tmp / "index.html", _page_html(page_id, page_items))

    write_dir_atomically(out_dir, write)
    atomic_write_json(key_path, {"format": KEY_FORMAT, "page_id": page_id, "seed": seed, "items": key_items})
    return out_dir / "index.html", key_path


# ---------------------------------------------------------------- answers back to GSB


def _read_json(path: Path, fmt: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise AnswersError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != fmt:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise AnswersError(f"{path}: expected a JSON object with format {fmt!r}, got format {got!r}")
    return data


def _read_key(key_path: Path) -> tuple[str, dict[str, str]]:
    """Key file -> (page id, {item id: which model is on the left, "A" or "B"})."""
    key = _read_json(key_path, KEY_FORMAT)
    left_of = {}
    for i, item in enumerate(key.get("items", [])):
        if not isinstance(item, dict) or item.get("left") not in ("A", "B") or "id" not in item:
            raise AnswersError(f"{key_path}: items[{i}] needs an id and left = 'A' or 'B', got {item!r}")
        left_of[item["id"]] = item["left"]
    if not left_of:
        raise AnswersError(f"{key_path}: no items")
    return key.get("page_id"), left_of


def gsb_from_answers(answers_path: str | Path, key_path: str | Path) -> GSBResult:
    """Map a person's Left / Same / Right answers back to G / S / B for model A with the key.

    Unanswered items (null or absent) are counted in ``result.unanswered``, not dropped silently.
    Raises AnswersError naming the file and item for an unknown item, an invalid choice, or answers
    made on a different page than the key describes.
    """
    answers_path, key_path = Path(answers_path), Path(key_path)
    key_page, left_of = _read_key(key_path)
    data = _read_json(answers_path, ANSWERS_FORMAT)
    if data.get("page_id") != key_page:
        raise AnswersError(
            f"{answers_path}: page_id {data.get('page_id')!r} does not match the key's {key_page!r} "
            f"({key_path}); these answers are for another page"
        )
    answers = data.get("answers")
    if not isinstance(answers, dict):
        raise AnswersError(
            f"{answers_path}: 'answers' must be an object {{item id: choice}}, got {answers!r}"
        )
    verdicts, unanswered = [], 0
    for item_id, choice in answers.items():
        if item_id not in left_of:
            raise AnswersError(f"{answers_path}: item {item_id!r} is not in the key {key_path}")
        if choice is None:
            unanswered += 1
        elif choice not in CHOICES:
            raise AnswersError(
                f"{answers_path}: item {item_id!r}: choice {choice!r}; valid: {CHOICES} or null"
            )
        elif choice == "same":
            verdicts.append("S")
        else:
            a_chosen = (choice == "left") == (left_of[item_id] == "A")
            verdicts.append("G" if a_chosen else "B")
    unanswered += sum(item_id not in answers for item_id in left_of)
    if not verdicts:
        raise AnswersError(f"{answers_path}: no item answered ({unanswered} unanswered)")
    return gsb(verdicts, unanswered=unanswered)


# ---------------------------------------------------------------- `zr gsb` (wired in cli.py's table)


def cli_run(args: argparse.Namespace) -> int:
    result = gsb_from_answers(args.answers, args.key)
    print(render_gsb_markdown(result, args.label_a, args.label_b), end="")
    total = result.good + result.same + result.bad + result.unanswered
    print(f"unanswered: {result.unanswered} of {total} items (not counted in GSB)")
    return 0
