"""``zr demo`` stage 5: ``report.md``, PNG figures and ``metrics.json`` from what the run measured.

Every number comes from the stages' summaries (their ``done.json``) and the files the recipes wrote;
nothing is typed in except the paper's own figures (METHOD.md §5), which stand in a separate,
labelled column: a different world, different models and a different scale.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from zr_diffusion.rubric import DIMENSIONS

if TYPE_CHECKING:
    from zr_diffusion.synthetic.stages import Context

# METHOD.md §5 (Qwen3.5 backbones, the paper's internal test set). Keyed by the demo's run names.
PAPER_TABLE = {
    "teacher_sft": ("27B SFT", 0.6458, 0.5914, 0.8135, 0.9644),
    "rewarddance": ("27B RewardDance", 0.6667, 0.6207, 0.8425, 0.9706),
    "grpo": ("27B GRPO", 0.7200, 0.6832, 0.8604, 0.9827),
    "gdso": ("27B GDSO (teacher)", 0.7620, 0.7132, 0.8956, 0.9885),
    "student_sft": ("9B SFT", 0.5296, 0.4942, 0.7459, 0.8401),
    "opd": ("9B OPD (~750 tokens)", None, None, 0.8311, 0.9643),
    "risd": ("9B RISD (1 token)", 0.7391, 0.6882, 0.8864, 0.9801),
}
PAPER_GSB = 0.413  # Z-Image SFT + Z-Reward vs the SFT baseline, 400 held-out prompts
PACKAGES = ("torch", "transformers", "diffusers", "peft", "accelerate", "numpy", "matplotlib")
VARIANT_LABELS = {"base": "base (from scratch)", "sft": "SFT", "zreward": "Z-Reward"}


def _fmt(v, digits: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def _curve(path: str | Path, key: str = "loss", section: str = "train") -> tuple[list[int], list[float]]:
    path = Path(path)
    if not path.is_file():
        return [], []
    rows = [r for r in json.loads(path.read_text()).get(section, []) if r.get(key) is not None]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def _smooth(y: list[float]) -> np.ndarray:
    k = max(1, len(y) // 20)
    if k == 1:
        return np.asarray(y)
    return np.convolve(np.asarray(y), np.ones(k) / k, mode="valid")


# --------------------------------------------------------------------------------------------------
# figures


def figure_accuracy(ctx: Context, path: Path) -> None:
    import matplotlib.pyplot as plt

    runs = ctx.results["reward"]["runs"]
    order = ctx.results["reward"]["order"]
    labels = [runs[n]["label"] for n in order]
    hpa = [runs[n]["eval"]["metrics"]["overall"]["hpa"] for n in order]
    mhpa = [runs[n]["eval"]["metrics"]["overall"]["margin_hpa"] for n in order]
    paper = [PAPER_TABLE[n][3] if n in PAPER_TABLE else None for n in order]
    x = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(11, 4.5))
    w = 0.27
    ax.bar(x - w, [v if v is not None else 0 for v in hpa], w, label="HPA (this run)", color="#3b6ea5")
    ax.bar(x, [v if v is not None else 0 for v in mhpa], w, label="margin HPA (this run)", color="#8fb3d9")
    ax.bar(
        x + w,
        [v if v is not None else 0 for v in paper],
        w,
        label="HPA, paper (Qwen3.5, internal set; other scale)",
        color="none",
        edgecolor="#999",
        hatch="//",
    )
    latent = ctx.results["world"]["reference"]["latent"]["overall"]["hpa"]
    if latent is not None:
        ax.axhline(latent, ls="--", color="#c44", lw=1, label="latent true score vs annotators (reference)")
    ax.axhline(0.5, ls=":", color="#555", lw=1, label="chance")
    for xi, v in zip(x - w, hpa):
        if v is not None:
            ax.text(xi, v + 0.01, f"{v:.2f}", ha="center", fontsize=7)
    ax.set_xticks(x, labels, rotation=20, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy on test pairs")
    ax.set_title("Reward models on the world's multi-annotator test split (HPA, Eq. 17)")
    ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _curve_panels(ctx: Context) -> list[tuple[str, list[tuple[str, list[int], list[float]]], str]]:
    vlm = ctx.results["vlm"]
    panels = [
        (
            "perception pretraining",
            [
                (role, *_curve(Path(vlm[role]["model"]).parent / "metrics.json"))
                for role in ("teacher", "student")
            ],
            "CE / token",
        )
    ]
    runs = ctx.results["reward"]["runs"]
    for name in ctx.results["reward"]["order"]:
        if "train_metrics" in runs[name]:
            panels.append((runs[name]["label"], [("loss", *_curve(runs[name]["train_metrics"]))], "loss"))
    gen = ctx.results["generator"]
    base_metrics = gen["base"]["train_metrics"]
    panels.append(
        (
            "generator from scratch",
            [
                ("VAE MSE", *_curve(base_metrics, "mse", "vae")),
                ("denoiser ε-MSE", *_curve(base_metrics)),
            ],
            "loss",
        )
    )
    panels.append(("t2i SFT LoRA", [("denoising loss", *_curve(gen["sft"]["train_metrics"]))], "loss"))
    panels.append(
        (
            "t2i Z-Reward LoRA",
            [("student reward R", *_curve(gen["zreward"]["train_metrics"], "reward"))],
            "reward",
        )
    )
    return panels


def figure_curves(ctx: Context, path: Path) -> None:
    import matplotlib.pyplot as plt

    panels = _curve_panels(ctx)
    cols = 4
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False)
    for ax, (title, series, ylabel) in zip(axes.flat, panels):
        for name, steps, values in series:
            if not steps:
                continue
            (line,) = ax.plot(steps, values, lw=0.8, alpha=0.35)
            smooth = _smooth(values)
            ax.plot(steps[len(steps) - len(smooth) :], smooth, lw=1.5, color=line.get_color(), label=name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.tick_params(labelsize=7)
        if len(series) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle("Training curves (every run of this demo; raw and smoothed)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def figure_samples(ctx: Context, path: Path) -> None:
    import matplotlib.pyplot as plt

    from zr_diffusion.synthetic.oracle_gsb import load_items

    gsb = ctx.results["generator"]["gsb"]
    prompts = gsb["item_prompts"]
    n_prompts = gsb["prompts"]
    seeds = gsb["seeds"][:2]
    images = {v: load_items(gsb["images"][v]) for v in ("sft", "zreward")}
    rows = min(ctx.cfg.generator.gsb.grid_prompts, n_prompts)
    cols = 2 * len(seeds)
    fig, axes = plt.subplots(rows, cols, figsize=(1.7 * cols + 2.2, 1.7 * rows), squeeze=False)
    for r in range(rows):
        for s in range(len(seeds)):
            for k, variant in enumerate(("sft", "zreward")):
                ax = axes[r, 2 * s + k]
                img = images[variant][s * n_prompts + r].permute(1, 2, 0).numpy()
                ax.imshow(np.clip(img, 0, 1), interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{VARIANT_LABELS[variant]}\nseed {seeds[s]}", fontsize=8)
        axes[r, 0].set_ylabel(prompts[r], fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("Held-out prompts: SFT vs Z-Reward (same noise per seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------
# the Markdown report


def _header(ctx: Context, versions: dict, wall: float) -> list[str]:
    cfg = ctx.cfg
    stage_times = ", ".join(
        f"{s} {ctx.results[s]['seconds']:.0f} s" + (" (cached)" if ctx.results[s].get("cached") else "")
        for s in ctx.results
    )
    return [
        "# `zr demo`: Z-Reward end to end in the synthetic world",
        "",
        "> **Different world and scale from the paper.** Tiny VLMs and a tiny generator trained for minutes "
        "on a CPU, in a procedurally rendered world whose ground truth is known exactly. The numbers compare "
        "the methods with each other in this world; the paper's figures (Qwen3.5-27B/9B, Z-Image, its internal "
        "test set) are shown beside them for orientation only. Every number in the 'this run' columns was "
        "measured by the run that wrote this file.",
        "",
        "| | |",
        "|---|---|",
        f"| preset | `{cfg.preset}` |",
        f"| seed | {cfg.seed} (world and every run) |",
        f"| wall time | {wall:.0f} s for the stages run by the invocation that wrote this report; stage "
        f"times: {stage_times} |",
        f"| machine | {platform.platform()}, {_cpus()} CPUs, torch threads {cfg.threads} |",
        "| versions | " + ", ".join(f"{k} {v}" for k, v in versions.items()) + " |",
        f"| config | `{ctx.root / 'config.yaml'}` (the full resolved config) |",
        f"| written | {time.strftime('%Y-%m-%d %H:%M:%S')} |",
        "",
    ]


def gate_rows(ctx: Context) -> list[dict]:
    """Every precondition gate measured by this run: name, what it measures, value, threshold, passed."""
    gate = ctx.results["generator"]["gate"]
    where = f"{gate['prompts']} {gate['split']} prompts x {len(gate['seeds'])} seeds"
    c = gate["checks"]
    return vlm_gate_rows(ctx) + [
        {
            "gate": "generator: oracle alignment mean",
            "on": where,
            "value": f"{c['alignment']['value']:.2f}",
            "threshold": f">= {c['alignment']['threshold']:.2f}",
            "passed": c["alignment"]["passed"],
        },
        {
            "gate": "generator: oracle aggregate / renders' aggregate",
            "on": f"{where}; renders {gate['render_means']['aggregate']:.2f}",
            "value": f"{c['aggregate_ratio']['value']:.2f}",
            "threshold": f">= {c['aggregate_ratio']['threshold']:.2f}",
            "passed": c["aggregate_ratio"]["passed"],
        },
    ]


def vlm_gate_rows(ctx: Context) -> list[dict]:
    """One row per (base VLM, perception attribute): accuracy on held-out renders vs the fixed threshold."""
    from zr_diffusion.synthetic.gates import perception_checks
    from zr_diffusion.synthetic.pretrain import PERCEPTION_ATTRIBUTES

    rows = []
    for role in ("teacher", "student"):
        p = ctx.results["vlm"][role]["perception"]
        checks = perception_checks(p, ctx.cfg.vlm.gate.threshold(role), PERCEPTION_ATTRIBUTES)
        rows += [
            {
                "gate": f"VLM {role}: {attr} named right",
                "on": f"{p['images']} val renders, greedy",
                "value": f"{c['value']:.3f}",  # 3 digits: 0.898 must not read as 0.90 and fail
                "threshold": f">= {c['threshold']:.2f}",
                "passed": c["passed"],
            }
            for attr, c in checks.items()
        ]
    return rows


def gate_result(passed: bool) -> str:
    """A gate's result cell."""
    return "pass" if passed else "**FAIL**"


def failed_gates_banner(failed: Sequence[str], total: int | None = None) -> list[str]:
    """The lines that state failed gates first, above the gate table (none when no gate failed)."""
    if not failed:
        return []
    count = f"{len(failed)}" if total is None else f"{len(failed)} of {total}"
    return [
        f"> **{count} gate(s) FAILED: {'; '.join(failed)}.** The comparisons below rest on a "
        "precondition that does not hold; read them as such.",
        "",
    ]


def _gates_section(ctx: Context) -> list[str]:
    rows = gate_rows(ctx)
    lines = ["## Gates: preconditions on the shared base models", ""]
    lines += failed_gates_banner([r["gate"] for r in rows if not r["passed"]])
    lines += ["| gate | measured on | value | threshold | result |", "|---|---|---:|---:|---|"]
    lines += [
        f"| {r['gate']} | {r['on']} | {r['value']} | {r['threshold']} | {gate_result(r['passed'])} |"
        for r in rows
    ]
    return lines + [""]


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def _world_section(ctx: Context) -> list[str]:
    w = ctx.results["world"]
    wc = ctx.cfg.world_config()
    return [
        "## 1. World",
        "",
        f"{w['images']} images ({wc.image_size} px) of {wc.num_prompts} prompts "
        f"({w['prompts']['train']} train / {w['prompts']['val']} val / {w['prompts']['test']} test, split by "
        f"prompt), {wc.images_per_prompt} renders per prompt with independent defects. Records per split: "
        f"{w['records']['train']} / {w['records']['val']} / {w['records']['test']} (one per image and "
        f"dimension); annotations per record {w['annotations_per_record']['train']} (train) and "
        f"{w['annotations_per_record']['test']} (test, ground truth = drop highest and lowest, mean). "
        f"Same-prompt pairs with different scores: train {w['pairs']['train']}, test {w['pairs']['test']} "
        f"({w['margin_pairs']['test']} with a gap > 0.5). Share of images with a defect per dimension: "
        + ", ".join(f"{d} {w['defect_rate'][d]:.0%}" for d in DIMENSIONS)
        + ".",
        "",
    ]


def _vlm_section(ctx: Context) -> list[str]:
    v = ctx.results["vlm"]
    lines = [
        "## 2. Base VLMs (perception pretraining)",
        "",
        f"Family `{v['family']}` (tiny classes of the real transformers model, built from config). It was "
        "picked for speed on this CPU when the demo was built (not measured by this run): the `qwen3_5` tiny "
        "models' gated-delta linear-attention layers run transformers' reference PyTorch kernels here and "
        "were several times slower per step in training and in generation. Both models first learn to describe world images (next-token CE on the "
        "renderer's ground-truth description, in the teacher template, ending with the score marker; the "
        "score token itself is never trained here). Perception accuracy: greedy descriptions of "
        f"{v['teacher']['perception']['images']} held-out renders, first sentence compared word by word "
        "(chance: count 1/5, colour 1/8, shape 1/7, position 1/8, background 1/3).",
        "",
        "| model | params | held-out CE start → end | count | colour | shape | position | background | "
        "whole contents | tokens/description |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for role in ("teacher", "student"):
        r = v[role]
        p = r["perception"]
        lines.append(
            f"| {role} ({r['size']}) | {r['parameters']:,} | {r['val_loss_start']:.3f} → {r['val_loss_end']:.3f} | "
            f"{p['count_accuracy']:.0%} | {p['colour_accuracy']:.0%} | {p['shape_accuracy']:.0%} | "
            f"{p['position_accuracy']:.0%} | {p['background_accuracy']:.0%} | "
            f"{p['contents_accuracy']:.0%} | {p['tokens_per_description']:.0f} |"
        )
    ex = v["teacher"]["perception"]["examples"]
    if ex:
        lines += [
            "",
            f'Example (teacher, prompt "{ex[0]["prompt"]}"):',
            "",
            f"- truth: {ex[0]['truth']}",
            f"- generated: {ex[0]['generated']}",
        ]
    return lines + [""]


def _ties(m: dict) -> str:
    """The tie-rate and ties-as-half HPA cells of a metrics row (absent in rows cached before them)."""
    return f"{_fmt(m.get('tie_rate'))} | {_fmt(m.get('hpa_ties_half'))}"


def _reward_section(ctx: Context) -> list[str]:
    runs = ctx.results["reward"]["runs"]
    order = ctx.results["reward"]["order"]
    ref = ctx.results["world"]["reference"]
    gs = ctx.results["indomain"]["samples"]
    test = runs[order[0]]["eval"]["metrics"]["overall"]
    lines = [
        "## 3. Reward models",
        "",
        f"Test split: {test['records']} records, {test['pairs']} same-prompt pairs ({test['margin_pairs']} with a "
        "gap > 0.5). OPD and RISD distil from the GDSO teacher. Evaluation mode: *teacher* = sampled "
        "reasoning, then the score read after the marker; *student* = the score read right after the prompt. "
        "Training settings (steps, batch, learning rate, what is trained) are in each run's `config.yaml` "
        f"under `{ctx.dir('reward')}/<run>/`; `zr train-reward --config <that file>` reruns it. Chance HPA is 0.5.",
        "",
        "| model | mode | PLCC | SRCC | HPA | margin HPA | tie rate | HPA, ties ½ | tokens/call | images/s | steps "
        "| train s | gen. HPA | gen. ties || paper | PLCC | SRCC | HPA | margin HPA |",
        "|---|---|" + "---:|" * 12 + "---|---|" + "---:|" * 4,
    ]
    for name in order:
        r = runs[name]
        m, gen = r["eval"]["metrics"]["overall"], r["eval_generated"]
        paper = PAPER_TABLE.get(name)
        paper_cells = (
            f"{paper[0]} | " + " | ".join(_fmt(x) if x is not None else "–" for x in paper[1:])
            if paper
            else "– | – | – | – | –"
        )
        lines.append(
            f"| {r['label']} | {r['eval_mode']} | {_fmt(m['plcc'])} | {_fmt(m['srcc'])} | {_fmt(m['hpa'])} | "
            f"{_fmt(m['margin_hpa'])} | {_ties(m)} | {r['eval']['tokens_per_call']:.1f} | {r['eval']['images_per_second']:.1f} | "
            f"{r.get('steps', 0)} | {r.get('train_seconds', 0):.0f} | {_fmt(gen['metrics']['overall']['hpa'])} | "
            f"{_fmt(gen['metrics']['overall'].get('tie_rate'), 3)} || {paper_cells} |"
        )
    for key, label in (
        ("latent", "reference: latent true score"),
        ("pixel_oracle", "reference: pixel oracle"),
    ):
        m = ref[key]["overall"]
        lines.append(
            f"| *{label}* | – | {_fmt(m['plcc'])} | {_fmt(m['srcc'])} | {_fmt(m['hpa'])} | {_fmt(m['margin_hpa'])} "
            f"| {_ties(m)} | – | – | – | – | – | – || | | | | |"
        )
    lines += [
        "",
        f"*gen.* columns: the second test set, the base generator's samples of the test prompts "
        f"({gs['test_images']} images, {gs['test_pairs']} pairs, annotated like the renders by the world's "
        "annotators), with the share of its pairs the model scores as a tie. Every model trained on the world's "
        f"training records plus {gs['train_images']} annotated generator samples of the training prompts.",
        "",
        "The reference rows are not models: the latent row scores each test image by the truth the "
        "annotators are noisy views of (an upper reference for any model), the pixel-oracle row by the "
        "analytic measurement that judges the generators below. HPA (Eq. 17) counts a tie (μ_a = μ_b) as "
        "wrong; *tie rate* is the share of pairs tied and *HPA, ties ½* counts them as half (a constant "
        "scorer gets 0.5), which matters for scorers with coarse values such as the oracle's grid.",
        "",
        "HPA per dimension (this run):",
        "",
        "| model | " + " | ".join(DIMENSIONS) + " |",
        "|---|" + "---:|" * len(DIMENSIONS),
    ]
    for name in order:
        m = runs[name]["eval"]["metrics"]
        lines.append(
            f"| {runs[name]['label']} | " + " | ".join(_fmt(m[d]["hpa"], 3) for d in DIMENSIONS) + " |"
        )
    lines += ["", "![accuracy](report/accuracy.png)", ""]
    return lines


def _generator_section(ctx: Context) -> list[str]:
    g = ctx.results["generator"]
    gsb = g["gsb"]
    om, rm = gsb["oracle_means"], gsb["student_reward_means"]
    lines = [
        "## 4. Generator",
        "",
        f"A tiny `{ctx.cfg.generator.generator.family}` pipeline trained from scratch here ({g['base']['denoiser_params']:,} "
        f"denoiser parameters, {g['base']['train_images']} renders of training prompts, VAE reconstruction MSE "
        f"{g['base']['vae_recon_mse']:.4f} in [-1, 1]; {g['base']['train_seconds']:.0f} s, "
        f"{g['base']['cpu_seconds']:.0f} CPU s at {g['base']['threads']} torch threads). SFT baseline: LoRA with the denoising loss on the "
        f"{g['sft']['examples']} of {g['sft']['candidate_images']} training images whose mean annotated score is "
        f">= {g['sft']['min_score']}. Z-Reward: a LoRA on the SFT model (its LoRA fused in) trained with reward "
        f"gradients from the frozen RISD student (student reward during training "
        f"{_fmt(g['zreward']['reward_first'], 3)} → {_fmt(g['zreward']['reward_last'], 3)}). "
        f"GSB on {gsb['items']} held-out items ({gsb['prompts']} test prompts x {len(gsb['seeds'])} seeds, "
        f"same noise for every model), each judged by {gsb['raters_per_item']} oracle annotators (the "
        "analytic pixel oracle seen through an annotator's bias and noise, on the half-point grid; tie "
        f"margin {gsb['tie_margin']}); an item's verdict is their majority. No learned model judges.",
        "",
        "| comparison | G | S | B | GSB (this run) | paper |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, c in gsb["comparisons"].items():
        paper = f"{PAPER_GSB:+.1%} (Z-Image, 400 prompts)" if key == "zreward_vs_sft" else "–"
        lines.append(
            f"| {VARIANT_LABELS[c['a']]} vs {VARIANT_LABELS[c['b']]} | {c['good']} | {c['same']} | {c['bad']} | "
            f"{c['gsb']:+.1%} | {paper} |"
        )
    lines += [
        "",
        "Mean score per dimension on the held-out items: the oracle (true score from pixels) and the RISD "
        "student (the reward the Z-Reward LoRA maximised). A student score that rises while the oracle's "
        "does not is reward hacking.",
        "",
        "| model | judge | " + " | ".join(DIMENSIONS) + " | aggregate |",
        "|---|---|" + "---:|" * (len(DIMENSIONS) + 1),
    ]
    for v in ("base", "sft", "zreward"):
        for judge, table in (("oracle", om), ("RISD student", rm)):
            lines.append(
                f"| {VARIANT_LABELS[v]} | {judge} | "
                + " | ".join(f"{table[v][d]:.3f}" for d in DIMENSIONS)
                + f" | {table[v]['aggregate']:.3f} |"
            )
    lines += _selection_lines(g["zreward"])
    lines += [
        "",
        f"Side-by-side review page for people: `{gsb['review_page']}`.",
        "",
        "![samples](report/samples.png)",
        "",
    ]
    return lines


def _selection_lines(zr: dict) -> list[str]:
    """Which Z-Reward LoRA the GSB compares, and the oracle-vs-step diagnostic figure."""
    sel = zr.get("selection")
    if not sel:
        return ["", f"Z-Reward LoRA compared: the last step's ({zr['lora']}); no validation selection."]
    stop = zr.get("stopped_early")
    lines = [
        "",
        f"Z-Reward LoRA compared: step {sel['step']} of {zr['steps_run']} (`best/`), selected by the held-out "
        f"judge `{sel['select_by']}` ({sel['value']:.3f} ± {sel['se']:.3f} SE)"
        + (f"; stopped early at step {stop['step']} (patience {stop['patience']})" if stop else "")
        + f"; {zr['hacking_warnings']} hacking warning(s).",
    ]
    if "oracle_by_step" in zr:
        path = Path(zr["oracle_by_step"]["png"])
        lines += [
            "The oracle's score of every validated LoRA (diagnostic only, never used to select), beside the "
            "proxy (RISD student) and the judge:",
            "",
            f"![oracle by step]({path.parent.parent.name}/{path.parent.name}/{path.name})",
        ]
    return lines


def _metrics(ctx: Context, versions: dict, wall: float) -> dict:
    from zr_diffusion.config import to_dict
    from zr_diffusion.synthetic.budget import budget_metrics

    return {
        "format": "zr-demo-metrics/1",
        "preset": ctx.cfg.preset,
        "seed": ctx.cfg.seed,
        "config": to_dict(ctx.cfg),
        "versions": versions,
        "wall_seconds_this_invocation": wall,
        "stage_seconds": {s: ctx.results[s]["seconds"] for s in ctx.results},
        "stages": {s: ctx.results[s] for s in ctx.results},
        "gates": gate_rows(ctx),
        "reward_budget": budget_metrics(ctx),
        "paper": {
            "reward_table": {
                k: dict(zip(("name", "plcc", "srcc", "hpa", "margin_hpa"), v)) for k, v in PAPER_TABLE.items()
            },
            "gsb_zreward_vs_sft": PAPER_GSB,
        },
    }


def run_report(ctx: Context, folder: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from zr_diffusion.config import save_config
    from zr_diffusion.io import atomic_write_json, atomic_write_text
    from zr_diffusion.synthetic.budget import budget_section, figure_val_hpa_cpu

    wall = sum(r["seconds"] for r in ctx.results.values() if not r.get("cached"))
    versions = _versions()
    figures = {
        "accuracy": folder / "accuracy.png",
        "curves": folder / "curves.png",
        "samples": folder / "samples.png",
        "val_hpa_cpu": folder / "val_hpa_cpu.png",
    }
    reward = ctx.results["reward"]
    figure_val_hpa_cpu(
        reward["runs"], reward["order"], ctx.cfg.reward.budget_cpu_seconds, figures["val_hpa_cpu"]
    )
    figure_accuracy(ctx, figures["accuracy"])
    figure_curves(ctx, figures["curves"])
    figure_samples(ctx, figures["samples"])
    save_config(ctx.cfg, ctx.root / "config.yaml")
    lines = (
        _header(ctx, versions, wall)
        + _gates_section(ctx)
        + _world_section(ctx)
        + _vlm_section(ctx)
        + _reward_section(ctx)
        + budget_section(ctx, figures["val_hpa_cpu"])
        + _generator_section(ctx)
        + ["## 5. Training curves", "", "![curves](report/curves.png)", ""]
    )
    atomic_write_text(ctx.root / "report.md", "\n".join(lines))
    atomic_write_json(ctx.root / "metrics.json", _metrics(ctx, versions, wall))
    return {
        "line": f"{ctx.root / 'report.md'}, {ctx.root / 'metrics.json'}, figures in {folder}",
        "report": str(ctx.root / "report.md"),
        "metrics": str(ctx.root / "metrics.json"),
        "figures": {k: str(v) for k, v in figures.items()},
    }
