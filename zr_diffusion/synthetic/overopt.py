"""Over-optimisation in the manner of Gao et al. 2022, and the gold (oracle) score per validation step.

The Z-Reward LoRA is trained against each differentiable reward model in turn (``SweepSettings.rewards``)
for a fixed number of steps, without early stopping; ``finetune_t2i``'s validation (val prompts x fixed
noise seeds) records the proxy, the optimised reward's own score, and keeps the LoRA of every
validation (``validation.keep_loras``). Post hoc, each kept LoRA regenerates the same items and is
scored by

- the gold score: the oracle's mean true score (aggregate and per dimension), never used to select;
- the deviation: the mean squared difference of the denoiser's ε-prediction with and without the
  LoRA on a fixed probe set of (noised latent, timestep, prompt) (:func:`prediction_deviation`).

Plots: gold and proxy against steps and against the deviation, one line per reward model; over the
seeds of a study, the mean with each seed's line thin, and a table of where gold peaks.

Dimension names: N probe items, P prompts, K probe timesteps, C/h/w latent.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch

if TYPE_CHECKING:
    from zr_diffusion.pipelines.base import T2IAdapter
    from zr_diffusion.pipelines.sampler import SamplerConfig
    from zr_diffusion.synthetic.stages import Context

FIGURE = "overoptimisation.png"
NUMBERS = "overoptimisation.json"


@dataclass
class SweepSettings:
    """The over-optimisation sweep: one Z-Reward LoRA per reward model, trained ``steps`` steps (the
    generator stage's ``zreward`` settings, without judges, selection or early stopping), evaluated at
    step 0 and every ``every`` steps on the Z-Reward run's validation items."""

    # Run by ``zr demo --seeds`` (the study) only: a single-seed ``zr demo`` never runs it (issue 12
    # §3 keeps it out of the default preset's time budget).
    enabled: bool = True
    rewards: tuple[str, ...] = ("risd", "student_sft", "opd")  # reward-stage runs, each optimised in turn
    steps: int = 24  # optimizer steps per reward model (the Z-Reward run has up to 60)
    every: int = 8  # evaluation interval: steps 0, 8, 16, 24
    # No regulariser: the sweep asks how far each reward can be pushed before gold turns down (Gao et
    # al.'s curves are against the distance from the start, not held near it)
    reg_weight: float = 0.0
    probe_timesteps: int = 4  # timesteps of the deviation probe, spread over the sampler's schedule

    def __post_init__(self) -> None:
        from zr_diffusion.synthetic.demo_reward import RUNS

        valid = [r.name for r in RUNS]
        bad = [r for r in self.rewards if r not in valid]
        if not self.rewards or bad or len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"sweep.rewards {list(self.rewards)}: give distinct reward runs of {valid}")
        if self.every < 1 or self.steps < self.every:
            raise ValueError(f"sweep: need 1 <= every <= steps, got every={self.every}, steps={self.steps}")
        if self.reg_weight < 0 or self.probe_timesteps < 1:
            raise ValueError(
                f"sweep: reg_weight must be >= 0 and probe_timesteps >= 1, got {self.reg_weight}, "
                f"{self.probe_timesteps}"
            )


# ---- the deviation from the base prediction ------------------------------------------------------


class Probe(NamedTuple):
    latents: torch.Tensor  # [N, C, h, w] noised latents x_t, N = K · P
    timesteps: torch.Tensor  # [N] in the scheduler's units
    prompts: list[str]  # N prompts


@torch.no_grad()
def build_probe(
    adapter: T2IAdapter, prompts: list[str], sampler: SamplerConfig, num_timesteps: int, seed: int
) -> Probe:
    """The base model's samples of ``prompts`` (noise from ``seed``), re-noised with fixed noise to
    ``num_timesteps`` steps spread evenly over the sampler's T steps; built before any LoRA."""
    from zr_diffusion.pipelines.sampler import sample

    x0 = (
        sample(adapter, prompts, sampler, seed=seed, grad=False).latents[: len(prompts)].float()
    )  # [P, C, h, w]
    timesteps = adapter.set_timesteps(sampler.num_steps, sampler.height, sampler.width)  # [T]
    generator = torch.Generator().manual_seed(seed)
    latents, ts = [], []
    for i in np.linspace(0, sampler.num_steps - 1, num_timesteps).round().astype(int):
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        latents.append(adapter.renoise(x0, int(i), noise))
        ts.append(timesteps[int(i)].expand(len(prompts)))
    return Probe(torch.cat(latents), torch.cat(ts), list(prompts) * len(latents))


def squared_deviation(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Σ (f_LoRA − f_base)² over every element, and the element count: [2] (summed over batches)."""
    diff = tuned.double() - base.double()
    return torch.stack([diff.pow(2).sum(), torch.tensor(float(diff.numel()), dtype=torch.float64)])


@torch.no_grad()
def prediction_deviation(adapter: T2IAdapter, probe: Probe, batch_size: int) -> float:
    """mean_{n,c,h,w} (ε_LoRA(x_n, t_n, p_n) − ε_base(x_n, t_n, p_n))²: the conditional denoiser output
    (guidance off, scale 1) with the adapter's LoRA and with it disabled, on the probe items."""
    total = torch.zeros(2, dtype=torch.float64)
    for start in range(0, len(probe.prompts), batch_size):
        x = probe.latents[start : start + batch_size].to(adapter.device)  # [b, C, h, w]
        t = probe.timesteps[start : start + batch_size]  # [b]
        cond = adapter.encode_prompts(probe.prompts[start : start + batch_size], guidance_scale=1.0)
        tuned = adapter.model_output_at(x, t, cond)  # [b, C, h, w]
        adapter.denoiser.disable_adapters()
        try:
            base = adapter.model_output_at(x, t, cond)  # [b, C, h, w]
        finally:
            adapter.denoiser.enable_adapters()
        total += squared_deviation(tuned, base).cpu()
    return float(total[0] / total[1])


# ---- one evaluation point ------------------------------------------------------------------------


class EvalItems(NamedTuple):
    """The validation items of a run: prompts x noise seeds, as ``finetune_t2i`` generated them."""

    prompts: list[str]
    seeds: tuple[int, ...]
    scenes: list  # the world Scene of each item, seed-major
    sampler: SamplerConfig
    batch_size: int  # the validation's batch size (an item's noise depends on it)


def eval_items(ft_cfg, scenes_by_prompt: dict) -> EvalItems:
    """The items of ``ft_cfg.validation`` (a FinetuneT2IConfig), with their scenes."""
    from zr_diffusion.pipelines.evaluate import items
    from zr_diffusion.pipelines.prompts import load_prompts
    from zr_diffusion.pipelines.validation import validation_prompts

    v = ft_cfg.validation
    prompts = validation_prompts(v, load_prompts(ft_cfg.prompts))
    scenes = [scenes_by_prompt[p] for p, _ in items(prompts, v.seeds)]
    return EvalItems(prompts, tuple(v.seeds), scenes, ft_cfg.sampler, v.batch_size)


@torch.no_grad()
def evaluate_lora(pipeline: str, lora: str, its: EvalItems, probe: Probe | None) -> dict:
    """The gold score (oracle means per dimension and aggregate) of the LoRA's images of the items,
    and its deviation on ``probe`` (None: not measured)."""
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.evaluate import generate
    from zr_diffusion.synthetic.oracle_gsb import mean_by_dimension, oracle_table

    adapter = load_adapter(pipeline)
    adapter.load_lora(lora)
    images = generate(adapter, its.prompts, its.seeds, its.sampler, its.batch_size).float().clamp(0, 1)
    out = {"gold": mean_by_dimension(oracle_table(images, its.scenes))}
    if probe is not None:
        out["deviation"] = prediction_deviation(adapter, probe, its.batch_size)
    return out


def points_of_run(run_dir: Path, pipeline: str, its: EvalItems, probe: Probe | None) -> list[dict]:
    """Per validation of a finished run (keep_loras): step, proxy (± SE), judges, gold, deviation."""
    entries = json.loads((run_dir / "metrics.json").read_text())["validation"]
    points = []
    for e in entries:
        if "lora" not in e:
            raise ValueError(
                f"{run_dir / 'metrics.json'}: validation at step {e['step']} kept no LoRA "
                "(validation.keep_loras must be true)"
            )
        judges = {
            k: e[k] for k in e if k.startswith("judge/") and k.count("/") == 1 and not k.endswith("_se")
        }
        point = {"step": e["step"], "proxy": e["reward"], "proxy_se": e["reward_se"], "judges": judges}
        points.append(point | evaluate_lora(pipeline, e["lora"], its, probe))
    return points


# ---- peaks and means over seeds ------------------------------------------------------------------


def gold_peak(points: Sequence[dict]) -> dict:
    """Where the aggregate gold score peaks (the earliest step on ties), its value there and at the end."""
    if not points:
        raise ValueError("gold_peak needs at least one evaluation point")
    pts = sorted(points, key=lambda p: p["step"])
    peak = max(pts, key=lambda p: p["gold"]["aggregate"])  # max keeps the first of equal values
    return {
        "peak_step": peak["step"],
        "peak_deviation": peak.get("deviation"),
        "peak_gold": peak["gold"]["aggregate"],
        "start_gold": pts[0]["gold"]["aggregate"],
        "end_step": pts[-1]["step"],
        "end_gold": pts[-1]["gold"]["aggregate"],
        "end_proxy": pts[-1]["proxy"],
    }


def mean_points(runs: Sequence[Sequence[dict]]) -> list[dict]:
    """The point-wise mean over seeds of gold (every key), proxy and deviation at each common step."""
    steps = [p["step"] for p in runs[0]]
    if any([p["step"] for p in r] != steps for r in runs):
        raise ValueError(f"the seeds' sweeps were evaluated at different steps; expected {steps} in each")
    out = []
    for i, step in enumerate(steps):
        pts = [r[i] for r in runs]
        gold = {k: float(np.mean([p["gold"][k] for p in pts])) for k in pts[0]["gold"]}
        point = {"step": step, "gold": gold, "proxy": float(np.mean([p["proxy"] for p in pts]))}
        point["deviation"] = float(np.mean([p["deviation"] for p in pts]))
        out.append(point)
    return out


# ---- the figure and the study table --------------------------------------------------------------

_PANELS = (  # (y key, x key, title)
    ("gold", "step", "gold (oracle aggregate) vs step"),
    ("proxy", "step", "proxy (optimised reward) vs step"),
    ("gold", "deviation", "gold vs deviation from base ε"),
    ("proxy", "deviation", "proxy vs deviation from base ε"),
)


def _xy(points: Sequence[dict], y: str, x: str) -> tuple[list[float], list[float]]:
    ys = [p["gold"]["aggregate"] if y == "gold" else p[y] for p in points]
    return [p[x] for p in points], ys


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label_axes(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=7)


def _save(fig, path: Path) -> None:
    from zr_diffusion.io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    _pyplot().close(fig)


def plot_sweep(
    curves: dict[str, list[dict]],
    labels: dict[str, str],
    path: Path,
    per_seed: dict[str, list[list[dict]]] | None = None,
) -> None:
    """Gold and proxy against steps and against the deviation, one line per reward model; with
    ``per_seed``, ``curves`` are the means and each seed's line is drawn thin in the same colour."""
    fig, axes = _pyplot().subplots(2, 2, figsize=(9.0, 6.4))
    for ax, (y, x, title) in zip(axes.flat, _PANELS):
        for k, (name, points) in enumerate(curves.items()):
            colour = f"C{k}"
            for seed_points in (per_seed or {}).get(name, []):
                ax.plot(*_xy(seed_points, y, x), color=colour, lw=0.7, alpha=0.35)
            ax.plot(*_xy(points, y, x), color=colour, lw=1.8, marker="o", ms=3, label=labels.get(name, name))
        _label_axes(ax, title, "optimizer step" if x == "step" else "mean squared deviation")
    _save(fig, path)


def plot_oracle_by_step(points: list[dict], path: Path, selected: int | None) -> None:
    """The Z-Reward run's validations: proxy, each judge, and the oracle (aggregate and per dimension)
    against step; ``selected`` marks the kept step."""
    from zr_diffusion.rubric import DIMENSIONS

    steps = [p["step"] for p in points]
    panels = [("proxy: the optimised reward", {"reward": [p["proxy"] for p in points]})]
    panels += [(f"held-out {k}", {k: [p["judges"][k] for p in points]}) for k in points[0]["judges"]]
    gold = {d: [p["gold"][d] for p in points] for d in ("aggregate", *DIMENSIONS)}
    panels.append(("oracle (gold), diagnostic only", gold))
    fig, axes = _pyplot().subplots(1, len(panels), figsize=(4.0 * len(panels), 3.2), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for k, (key, ys) in enumerate(series.items()):
            ax.plot(steps, ys, marker="o" if k == 0 else None, ms=3, lw=1.6 if k == 0 else 0.8, label=key)
        if selected is not None:
            ax.axvline(selected, ls="--", color="#888", lw=1, label=f"selected: step {selected}")
        _label_axes(ax, title, "step")
    _save(fig, path)


def peak_table(curves: dict[str, list[dict]], labels: dict[str, str]) -> list[str]:
    """Markdown rows: per reward model, where gold peaks (step, deviation) and gold at start/peak/end."""
    lines = [
        "| optimised reward | gold peaks at step | deviation at the peak | gold at step 0 | gold at the peak "
        "| gold at the end | proxy at the end |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, points in curves.items():
        p = gold_peak(points)
        lines.append(
            f"| {labels.get(name, name)} (optimised) | {p['peak_step']} | {p['peak_deviation']:.3g} | {p['start_gold']:.3f} "
            f"| {p['peak_gold']:.3f} | {p['end_gold']:.3f} (step {p['end_step']}) | {p['end_proxy']:.3f} |"
        )
    return lines


# ---- the runs ------------------------------------------------------------------------------------


def _sweep_run(ctx: Context, folder: Path, name: str) -> dict:
    from zr_diffusion.io import atomic_write_json
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.reward_finetune import finetune_t2i
    from zr_diffusion.synthetic.demo_t2i import scenes_by_prompt, zreward_config
    from zr_diffusion.synthetic.stages import deep_merge

    cfg, sw = ctx.cfg, ctx.cfg.sweep
    pipeline = ctx.results["generator"]["zreward"]["pipeline"]  # the SFT model: the LoRA's start
    model = ctx.results["reward"]["runs"][name]["model"]
    fixed = {  # a fixed length: no selection, no early stopping, no judges; every validation's LoRA kept
        "reg_weight": sw.reg_weight,
        "validation": {"every": sw.every, "select_by": None, "patience": None, "keep_loras": True},
        "run": {"max_steps": sw.steps},
    }
    settings = deep_merge(cfg.generator.zreward, fixed)
    settings["validation"]["judges"] = {}
    ft_cfg = zreward_config(ctx, folder, pipeline, model, settings)
    finetune_t2i(ft_cfg)
    its = eval_items(ft_cfg, scenes_by_prompt(Path(ctx.results["world"]["data"])))
    probe = build_probe(load_adapter(pipeline), its.prompts, ft_cfg.sampler, sw.probe_timesteps, cfg.seed)
    points = points_of_run(folder, pipeline, its, probe)
    atomic_write_json(folder / "points.json", points)
    return {"model": model, "points": points}


def run_sweep(ctx: Context) -> dict:
    """The sweep of one seed (each reward model's run cached as ``generator/sweep-<name>``); writes
    ``overoptimisation.json`` and ``overoptimisation.png`` in the seed's folder."""
    from zr_diffusion.config import to_dict
    from zr_diffusion.io import atomic_write_json
    from zr_diffusion.synthetic.demo_reward import RUNS

    cfg = ctx.cfg
    labels = {r.name: r.label for r in RUNS}
    zr = ctx.results["generator"]["zreward"]
    curves = {}
    for name in cfg.sweep.rewards:
        key = {
            "sweep": cfg.sweep,
            "zreward": cfg.generator.zreward,
            "start": zr["hash"],
            "reward": ctx.results["reward"]["runs"][name]["hash"],
            "seed": cfg.seed,
        }
        curves[name] = ctx.cache.run(
            f"generator/sweep-{name}", key, lambda d, name=name: _sweep_run(ctx, d, name)
        )["points"]
    numbers = {"seed": cfg.seed, "settings": to_dict(cfg.sweep), "labels": labels, "curves": curves}
    atomic_write_json(ctx.root / NUMBERS, numbers)
    plot_sweep(curves, labels, ctx.root / FIGURE)
    return numbers


def study_sweep_markdown(dirs: dict[int, Path], root: Path) -> str:
    """The study's over-optimisation section: the figure over seeds (mean, seeds thin), written to
    ``root``, and the peak table of the mean curves; empty when no seed ran the sweep."""
    from zr_diffusion.io import atomic_write_json

    found = {s: d / NUMBERS for s, d in dirs.items() if (d / NUMBERS).is_file()}
    if not found:
        return ""
    per_seed = {s: json.loads(p.read_text()) for s, p in found.items()}
    first = next(iter(per_seed.values()))
    labels, names = first["labels"], list(first["curves"])
    runs = {n: [per_seed[s]["curves"][n] for s in per_seed] for n in names}
    means = {n: mean_points(r) for n, r in runs.items()}
    atomic_write_json(root / NUMBERS, {"seeds": list(per_seed), "labels": labels, "mean": means})
    plot_sweep(means, labels, root / FIGURE, per_seed=runs)
    seeds = ", ".join(map(str, per_seed))
    lines = [
        "## Over-optimisation (Gao et al. 2022)",
        "",
        f"The Z-Reward LoRA trained against each reward model in turn for {first['settings']['steps']} step(s) "
        f"(no early stopping, reg_weight {first['settings']['reg_weight']}); at step 0 and every "
        f"{first['settings']['every']} step(s) the gold score (the oracle's mean aggregate on the validation "
        "prompts x fixed seeds), the proxy (the optimised model's own reward on the same images) and the "
        "mean squared deviation of the denoiser's ε-prediction from the start model's on a fixed probe set. "
        f"Mean over seeds {seeds} (thin lines: each seed); the table is of the mean curves.",
        "",
        f"![overoptimisation]({FIGURE})",
        "",
        *peak_table(means, labels),
        "",
        *(f"- seed {s}: {dirs[s] / FIGURE}" for s in per_seed),
        "",
    ]
    return "\n".join(lines)


__all__ = [
    "FIGURE",
    "NUMBERS",
    "EvalItems",
    "Probe",
    "SweepSettings",
    "build_probe",
    "eval_items",
    "evaluate_lora",
    "gold_peak",
    "mean_points",
    "peak_table",
    "plot_oracle_by_step",
    "plot_sweep",
    "points_of_run",
    "prediction_deviation",
    "run_sweep",
    "squared_deviation",
    "study_sweep_markdown",
]
