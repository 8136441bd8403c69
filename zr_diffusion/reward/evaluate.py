"""``zr eval-reward``: HPA, margin HPA, PLCC, SRCC, tokens per call and images/s (METHOD.md §5).

The metric functions are pure. A metric that is undefined on the data (no pairs, fewer than two
records, a constant list) raises :class:`MetricUndefined` with a short ``reason``;
:func:`compute_metrics` stores ``None`` plus that reason, and the report shows ``n/a (<reason>)``.
No NaN ever reaches ``metrics.json``.

``evaluate_reward`` writes ``metrics.json``, ``metrics.md`` and ``predictions.jsonl`` (one μ per record,
with its prompt and annotated score: the study's per-pair HPA needs them).

Dimension names: P pairs, N records, B images in a batch, D rubric dimensions, S score bins.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from zr_diffusion.data import ScoredRecord, build_pairs
from zr_diffusion.io import atomic_write_text

if TYPE_CHECKING:
    from zr_diffusion.reward.config import EvalRewardConfig

__all__ = [
    "EvalMetrics",
    "MetricRow",
    "MetricUndefined",
    "compute_metrics",
    "evaluate_reward",
    "hpa",
    "hpa_ties_half",
    "image_batches",
    "margin_hpa",
    "plcc",
    "score_student",
    "score_teacher",
    "srcc",
    "tie_rate",
    "write_report",
]

MARGIN = 0.5  # margin HPA keeps pairs with |ŝ_a − ŝ_b| > MARGIN (METHOD.md §5)
_EPS = 1e-9  # aggregated scores are float means: 3.5 − 3.0 must not count as > 0.5


class MetricUndefined(ValueError):
    """A metric has no value on these data; ``reason`` is the short text shown in the table."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# pure metrics


def _vector(x, name: str, fn: str) -> torch.Tensor:
    """Any 1-D sequence of finite numbers as a float64 tensor ``[N]``."""
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if t.dim() != 1:
        raise ValueError(f"{fn}: {name} must be 1-D (one value per item), got shape {tuple(t.shape)}")
    bad = (~torch.isfinite(t)).nonzero().flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"{fn}: {name}[{i}] = {float(t[i])} is not finite; every value must be a number")
    return t


def _pair_vectors(fn: str, mu_a, mu_b, s_a, s_b) -> tuple[torch.Tensor, ...]:
    names = ("mu_a", "mu_b", "s_a", "s_b")
    ts = tuple(_vector(x, n, fn) for x, n in zip((mu_a, mu_b, s_a, s_b), names))
    lengths = {n: len(t) for n, t in zip(names, ts)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"{fn}: mu_a, mu_b, s_a, s_b need one value per pair each, got lengths {lengths}")
    return ts


def hpa(mu_a, mu_b, s_a, s_b) -> float:
    """Eq. 17: ``mean 1[(μ_a − μ_b)(ŝ_a − ŝ_b) > 0]`` over the pairs with ``ŝ_a ≠ ŝ_b``.

    All four inputs are ``[P]``. A model tie (``μ_a = μ_b``) counts as wrong. Raises
    :class:`MetricUndefined` ("0 pairs") when no pair has different annotated scores.
    """
    mu_a, mu_b, s_a, s_b = _pair_vectors("hpa", mu_a, mu_b, s_a, s_b)
    keep = s_a != s_b  # [P]
    if not bool(keep.any()):
        raise MetricUndefined("0 pairs", f"hpa: none of the {len(s_a)} pairs has ŝ_a ≠ ŝ_b")
    agree = (mu_a - mu_b)[keep] * (s_a - s_b)[keep] > 0  # [P']
    return agree.double().mean().item()


def tie_rate(mu_a, mu_b, s_a, s_b) -> float:
    """The share of Eq. 17's pairs (``ŝ_a ≠ ŝ_b``) that the model ties, ``mean 1[μ_a = μ_b]``.

    Inputs ``[P]``. :func:`hpa` counts these pairs as wrong; a model that ties often (a saturated or
    collapsed score distribution) loses HPA to ties rather than to wrong orderings. Raises
    :class:`MetricUndefined` ("0 pairs") like :func:`hpa`.
    """
    mu_a, mu_b, s_a, s_b = _pair_vectors("tie_rate", mu_a, mu_b, s_a, s_b)
    keep = s_a != s_b  # [P]
    if not bool(keep.any()):
        raise MetricUndefined("0 pairs", f"tie_rate: none of the {len(s_a)} pairs has ŝ_a ≠ ŝ_b")
    return (mu_a[keep] == mu_b[keep]).double().mean().item()


def hpa_ties_half(mu_a, mu_b, s_a, s_b) -> float:
    """HPA (Eq. 17) with a model tie counted as half right: ``hpa + tie_rate / 2``.

    Inputs ``[P]``; for a scorer with coarse values (the half-point annotation grid) whose ties are
    no ordering at all, this is the chance-corrected reading (a constant scorer gets 0.5, not 0).
    """
    return hpa(mu_a, mu_b, s_a, s_b) + 0.5 * tie_rate(mu_a, mu_b, s_a, s_b)


def margin_hpa(mu_a, mu_b, s_a, s_b, margin: float = MARGIN) -> float:
    """HPA (Eq. 17) restricted to the clear pairs, ``|ŝ_a − ŝ_b| > margin`` (default 0.5).

    Inputs ``[P]``. Raises :class:`MetricUndefined` ("0 pairs") when no pair clears the margin.
    """
    mu_a, mu_b, s_a, s_b = _pair_vectors("margin_hpa", mu_a, mu_b, s_a, s_b)
    keep = (s_a - s_b).abs() > margin + _EPS  # [P]
    if not bool(keep.any()):
        raise MetricUndefined(
            "0 pairs", f"margin_hpa: none of the {len(s_a)} pairs has |ŝ_a − ŝ_b| > {margin:g}"
        )
    return hpa(mu_a[keep], mu_b[keep], s_a[keep], s_b[keep])


def _check_correlation_inputs(fn: str, mu, s) -> tuple[torch.Tensor, torch.Tensor]:
    mu, s = _vector(mu, "mu", fn), _vector(s, "s", fn)
    if len(mu) != len(s):
        raise ValueError(f"{fn}: mu and s need one value per record each, got {len(mu)} and {len(s)}")
    if len(mu) < 2:
        n = f"{len(mu)} record" + ("" if len(mu) == 1 else "s")
        raise MetricUndefined(n, f"{fn}: needs at least 2 records, got {len(mu)}")
    for t, name in ((mu, "μ"), (s, "ŝ")):
        if bool((t == t[0]).all()):
            raise MetricUndefined(
                f"constant {name}", f"{fn}: all {len(t)} values of {name} equal {float(t[0]):g}"
            )
    return mu, s


def plcc(mu, s) -> float:
    """Pearson correlation of μ with ŝ, both ``[N]`` (torchmetrics ``PearsonCorrCoef``).

    Raises :class:`MetricUndefined` for fewer than 2 records or a constant input (zero variance).
    """
    from torchmetrics.functional import pearson_corrcoef

    mu, s = _check_correlation_inputs("plcc", mu, s)
    return float(pearson_corrcoef(mu, s))


def srcc(mu, s) -> float:
    """Spearman rank correlation of μ with ŝ, both ``[N]``; ties share their mean rank
    (torchmetrics ``SpearmanCorrCoef``). Undefined cases as for :func:`plcc`."""
    from torchmetrics.functional import spearman_corrcoef

    mu, s = _check_correlation_inputs("srcc", mu, s)
    return float(spearman_corrcoef(mu, s))


# --------------------------------------------------------------------------------------------------
# the metric table


METRICS = ("plcc", "srcc", "hpa", "margin_hpa")
TIE_METRICS = ("tie_rate", "hpa_ties_half")  # after the table's pair counts


@dataclass
class MetricRow:
    """The metrics of one dimension, or of all dimensions pooled (``name == "overall"``)."""

    name: str
    records: int
    pairs: int
    margin_pairs: int
    plcc: float | None
    srcc: float | None
    hpa: float | None
    margin_hpa: float | None
    undefined: dict[str, str] = field(default_factory=dict)  # metric -> why it has no value
    tie_rate: float | None = None  # share of HPA's pairs with μ_a = μ_b (counted wrong by hpa)
    hpa_ties_half: float | None = None  # HPA with those ties counted as half

    def cell(self, metric: str) -> str:
        value = getattr(self, metric)
        return f"{value:.4f}" if value is not None else f"n/a ({self.undefined[metric]})"


@dataclass
class EvalMetrics:
    """Rows for each dimension then ``overall``, plus the cost of one scoring call."""

    rows: list[MetricRow]
    tokens_per_call: float  # mean output tokens per (image, dimension) scoring call (student: 1)
    images_per_second: float  # (image, prompt) forward passes per second of model time
    margin: float = MARGIN
    info: dict = field(default_factory=dict)  # model, mode, data, timings: copied into metrics.json

    def row(self, name: str) -> MetricRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no metric row {name!r}; rows: {[r.name for r in self.rows]}")

    def to_json(self) -> dict:
        return {
            **self.info,
            "tokens_per_call": self.tokens_per_call,
            "images_per_second": self.images_per_second,
            "margin": self.margin,
            "metrics": {
                r.name: {
                    "records": r.records,
                    "pairs": r.pairs,
                    "margin_pairs": r.margin_pairs,
                    **{m: getattr(r, m) for m in METRICS + TIE_METRICS},
                    "undefined": dict(r.undefined),
                }
                for r in self.rows
            },
        }

    def to_markdown(self) -> str:
        head = ["dimension", "PLCC", "SRCC", "HPA", "margin HPA", "#pairs", "#margin pairs"]
        head += ["tie rate", "HPA, ties ½"]
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * 8) + "|"]
        for r in self.rows:
            cells = [r.name, *(r.cell(m) for m in METRICS), str(r.pairs), str(r.margin_pairs)]
            cells += [r.cell(m) for m in TIE_METRICS]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            f"tokens/call: {self.tokens_per_call:.1f}  ",
            f"images/s: {self.images_per_second:.2f}  ",
            f"records: {self.row('overall').records}; margin pairs: |ŝ_a − ŝ_b| > {self.margin:g}",
        ]
        return "\n".join(lines) + "\n"


def _guarded(fn, *args) -> tuple[float | None, str | None]:
    try:
        return fn(*args), None
    except MetricUndefined as e:
        return None, e.reason


def _metric_row(name: str, records: Sequence[ScoredRecord], mu: dict[str, float], margin: float) -> MetricRow:
    pairs = build_pairs(records)  # same prompt AND same dimension, ŝ_w > ŝ_l
    mu_w = [mu[p.w.id] for p in pairs]  # [P]
    mu_l = [mu[p.l.id] for p in pairs]
    s_w = [p.w.score for p in pairs]
    s_l = [p.l.score for p in pairs]
    values, undefined = {}, {}
    mus, ss = [mu[r.id] for r in records], [r.score for r in records]  # [N]
    for metric, fn, args in (
        ("plcc", plcc, (mus, ss)),
        ("srcc", srcc, (mus, ss)),
        ("hpa", hpa, (mu_w, mu_l, s_w, s_l)),
        ("margin_hpa", margin_hpa, (mu_w, mu_l, s_w, s_l, margin)),
        ("tie_rate", tie_rate, (mu_w, mu_l, s_w, s_l)),
        ("hpa_ties_half", hpa_ties_half, (mu_w, mu_l, s_w, s_l)),
    ):
        values[metric], reason = _guarded(fn, *args)
        if reason is not None:
            undefined[metric] = reason
    return MetricRow(
        name=name,
        records=len(records),
        pairs=len(pairs),
        margin_pairs=sum(abs(a - b) > margin + _EPS for a, b in zip(s_w, s_l)),
        undefined=undefined,
        **values,
    )


def compute_metrics(
    records: Sequence[ScoredRecord],
    mu_per_record: Sequence[float],
    *,
    tokens_per_call: float,
    images_per_second: float,
    dimensions: Sequence[str] | None = None,
    margin: float = MARGIN,
    info: dict | None = None,
) -> EvalMetrics:
    """One row per dimension and an ``overall`` row pooled over dimensions (METHOD.md §5).

    ``mu_per_record[i]`` is the model's μ for ``records[i]``; ground truth is ``record.score`` (the
    drop-high/low annotator mean). Pairs follow :func:`zr_diffusion.data.build_pairs`: same prompt
    and same dimension. ``dimensions`` fixes the row order (default: order of first appearance).
    """
    if len(mu_per_record) != len(records):
        raise ValueError(
            f"compute_metrics: got {len(mu_per_record)} μ values for {len(records)} records; "
            f"give one μ per record, in record order"
        )
    mu: dict[str, float] = {}
    for r, m in zip(records, mu_per_record):
        if r.id in mu:
            raise ValueError(f"compute_metrics: record id {r.id!r} appears twice; ids must be unique")
        if not math.isfinite(float(m)):
            raise ValueError(f"compute_metrics: μ of record {r.id!r} is {m}; every μ must be finite")
        mu[r.id] = float(m)
    if dimensions is None:
        dimensions = list(dict.fromkeys(r.dimension for r in records))
    unknown = sorted({r.dimension for r in records} - set(dimensions))
    if unknown:
        raise ValueError(f"compute_metrics: records of dimension(s) {unknown} not in {list(dimensions)}")
    for name, value in (("tokens_per_call", tokens_per_call), ("images_per_second", images_per_second)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"compute_metrics: {name} = {value}; it must be a finite number >= 0")
    rows = [_metric_row(d, [r for r in records if r.dimension == d], mu, margin) for d in dimensions]
    rows.append(_metric_row("overall", list(records), mu, margin))
    return EvalMetrics(
        rows=rows,
        tokens_per_call=float(tokens_per_call),
        images_per_second=float(images_per_second),
        margin=margin,
        info=dict(info or {}),
    )


def write_report(metrics: EvalMetrics, output_dir: str | Path) -> None:
    """``metrics.json`` and ``metrics.md`` in ``output_dir``, each written atomically."""
    out = Path(output_dir)
    text = json.dumps(metrics.to_json(), indent=2, allow_nan=False)  # a NaN here is a bug in this module
    atomic_write_text(out / "metrics.json", text + "\n")
    atomic_write_text(out / "metrics.md", metrics.to_markdown())


# --------------------------------------------------------------------------------------------------
# scoring: student (one pass per image, all D dimensions) and teacher (reasoning, then the score)


class ImageGroup(NamedTuple):
    """The records that share one forward pass: same image file and same prompt."""

    image: Path
    prompt: str
    records: list[int]  # indices into the record list, one per dimension


class Scoring(NamedTuple):
    mu: list[float]  # [N] expected score per record, in record order
    tokens: list[int]  # output tokens of every scoring call
    images: int  # forward passes over distinct (image, prompt)
    seconds: float  # model time only (image decoding excluded)
    reasoning: list[str | None]  # [N] first teacher reasoning text (None in student mode)


def image_batches(records: Sequence[ScoredRecord], batch_size: int) -> list[list[ImageGroup]]:
    """Group records by (image, prompt), then batch up to ``batch_size`` groups whose images share a
    size (one ``[B, 3, H, W]`` tensor per batch). Sizes are read from the file headers only."""
    from PIL import Image

    groups: dict[tuple[Path, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.image, r.prompt), []).append(i)
    by_size: dict[tuple[int, int], list[ImageGroup]] = {}
    for (image, prompt), idx in groups.items():
        with Image.open(image) as im:
            width, height = im.size
        by_size.setdefault((height, width), []).append(ImageGroup(image, prompt, idx))
    return [same[k : k + batch_size] for same in by_size.values() for k in range(0, len(same), batch_size)]


def _load_batch(batch: Sequence[ImageGroup], device: torch.device) -> torch.Tensor:
    from zr_diffusion.data import load_image

    return torch.stack([load_image(g.image) for g in batch]).to(device)  # [B, 3, H, W]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def score_student(model, records: Sequence[ScoredRecord], batches, device: torch.device) -> Scoring:
    """μ of every record from ``ZRewardModel``: one call per image gives all D dimensions; each
    (image, dimension) readout emits exactly one score token."""
    column = {d: k for k, d in enumerate(model.dimensions)}
    mu, images, seconds = [math.nan] * len(records), 0, 0.0
    for batch in batches:
        pixels = _load_batch(batch, device)
        start = time.perf_counter()
        out = model(pixels, [g.prompt for g in batch])  # mu [B, D]
        _sync(device)
        seconds += time.perf_counter() - start
        mus = out.mu.float().cpu()
        for b, g in enumerate(batch):
            for i in g.records:
                mu[i] = float(mus[b, column[records[i].dimension]])
        images += len(batch)
    return Scoring(mu, [1] * len(records), images, seconds, [None] * len(records))


@torch.no_grad()
def score_teacher(
    scorer, records: Sequence[ScoredRecord], batches, cfg: EvalRewardConfig, device: torch.device
) -> Scoring:
    """μ of every record from sampled reasoning: one vision pass per image, then ``teacher_samples``
    reasoning rollouts per (image, dimension), q read after the score marker; μ is the mean over the
    rollouts. Tokens per call = the tokens the model generated (reasoning, the marker when it wrote
    it, a sampled EOS) + the score token; a marker appended for the readout was not generated."""
    from zr_diffusion.scores import expected_score
    from zr_diffusion.vlm.reasoning import generate_reasoning

    bins = scorer.grid.values()
    mu, reasoning = [math.nan] * len(records), [None] * len(records)
    tokens, images, seconds = [], 0, 0.0
    for batch in batches:
        pixels = _load_batch(batch, device)
        index = [b for b, g in enumerate(batch) for _ in g.records]  # image of each input
        rec = [i for g in batch for i in g.records]
        start = time.perf_counter()
        features = scorer.encode_images(pixels)  # one vision pass per image
        samples = generate_reasoning(
            scorer,
            features.select(index),
            [records[i].prompt for i in rec],
            [records[i].dimension for i in rec],
            num_samples=cfg.teacher_samples,
            temperature=cfg.rollout.temperature,
            top_p=cfg.rollout.top_p,
            top_k=cfg.rollout.top_k,
            max_new_tokens=cfg.rollout.max_new_tokens,
        )  # [len(rec)][G]
        _sync(device)
        seconds += time.perf_counter() - start
        for i, outs in zip(rec, samples):
            mu[i] = sum(float(expected_score(s.probs.float().cpu(), bins)) for s in outs) / len(outs)
            tokens += [s.num_generated_tokens + 1 for s in outs]
            reasoning[i] = outs[0].text
        images += len(batch)
    return Scoring(mu, tokens, images, seconds, reasoning)


# --------------------------------------------------------------------------------------------------
# the recipe


def _device(name: str | None) -> torch.device:
    return torch.device(name if name else ("cuda" if torch.cuda.is_available() else "cpu"))


def evaluate_reward(cfg: EvalRewardConfig) -> EvalMetrics:
    """``zr eval-reward``: score the test records with ``cfg.model`` in student or teacher mode and
    write ``metrics.json``, ``metrics.md`` and ``predictions.jsonl`` to ``cfg.output_dir``."""
    from zr_diffusion.data import load_records

    grid = cfg.grid.build()
    records = load_records(cfg.data, grid=grid, dimensions=cfg.dimensions, skip_bad=cfg.skip_bad)
    records = records[: cfg.max_records] if cfg.max_records is not None else records
    if not records:
        raise ValueError(f"data: no records to evaluate in {cfg.data}")
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    batches = image_batches(records, cfg.batch_size)
    if cfg.mode == "student":
        from zr_diffusion.reward.model import ZRewardModel

        model = ZRewardModel.from_pretrained(
            cfg.model,
            dimensions=cfg.dimensions,
            grid=grid,
            dtype=cfg.dtype,
            device=device,
            trust_remote_code=cfg.trust_remote_code,
        )
        scoring = score_student(model, records, batches, device)
    elif cfg.mode == "teacher":
        from zr_diffusion.vlm.loading import load_vlm
        from zr_diffusion.vlm.readout import VLMScorer

        vlm, processor = load_vlm(
            cfg.model, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code
        )
        scorer = VLMScorer(vlm, processor, grid, enable_thinking=cfg.enable_thinking)
        scoring = score_teacher(scorer, records, batches, cfg, device)
    else:
        raise ValueError(f"mode {cfg.mode!r}: valid modes are 'student' and 'teacher'")
    info = {
        "model": cfg.model,
        "mode": cfg.mode,
        "data": cfg.data,
        "device": str(device),
        "dtype": cfg.dtype,
        "images": scoring.images,
        "scoring_calls": len(scoring.tokens),
        "scoring_seconds": scoring.seconds,
    }
    metrics = compute_metrics(
        records,
        scoring.mu,
        tokens_per_call=sum(scoring.tokens) / len(scoring.tokens),
        images_per_second=scoring.images / scoring.seconds if scoring.seconds > 0 else 0.0,
        dimensions=cfg.dimensions,
        info=info,
    )
    write_report(metrics, cfg.output_dir)
    predictions = [
        {"id": r.id, "prompt": r.prompt, "dimension": r.dimension, "score": r.score, "mu": m}
        | ({"reasoning": text} if text is not None else {})
        for r, m, text in zip(records, scoring.mu, scoring.reasoning)
    ]
    atomic_write_text(
        Path(cfg.output_dir) / "predictions.jsonl", "".join(json.dumps(p) + "\n" for p in predictions)
    )
    print(f"{cfg.mode} {cfg.model} on {cfg.data}: {len(records)} records, {scoring.images} images")
    print(metrics.to_markdown(), end="")
    return metrics
