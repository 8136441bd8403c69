"""The model card (``README.md`` with Hugging Face metadata) that ``zr export`` writes.

It states what the export is made of and how each LoRA was trained, read from the records the
recipes leave beside a LoRA folder ``RUN/<lora>``:

- ``RUN/config.yaml``: the run's config (``zr finetune-t2i`` or ``zr train-t2i-sft``): reward
  model(s), dimensions and weights, steps, sampler and regulariser;
- ``RUN/metrics.json``: the validation entries and any other run notes (selection, warnings);
- ``gsb.json`` of ``zr eval-t2i`` whose ``lora_a`` or ``lora_b`` is this LoRA: in the LoRA folder,
  in ``RUN``, in a folder of ``RUN``, or in a folder beside ``RUN`` (``runs/eval-sd`` beside
  ``runs/finetune-sd``).

What is not there is said to be "none found"; nothing is guessed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from zr_diffusion.pipelines.base import LORA_FAMILY_FILE

MAX_VALIDATION_ROWS = 12
TAGS = ("text-to-image", "diffusers", "zr-diffusion", "z-reward", "reward-fine-tuning")


class RunRecords(NamedTuple):
    """What the recipes left beside one LoRA folder (None / empty where nothing was found)."""

    lora: Path
    record: dict | None  # zr_lora.json: family, pipeline class, rank
    config: dict | None  # RUN/config.yaml
    metrics: dict | None  # RUN/metrics.json
    gsb: list[tuple[Path, dict]]  # gsb.json files that compare this LoRA


def _read(path: Path, parse) -> Any:
    try:
        return parse(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot be read for the model card ({type(e).__name__}: {e})") from None


def _names(recorded: str | None, lora: Path, loose: bool) -> bool:
    """Does a LoRA path recorded by ``zr eval-t2i`` name ``lora``? ``loose``: also when its last two
    parts match (a relative path recorded from another working folder)."""
    if not recorded:
        return False
    path = Path(recorded)
    return path.resolve() == lora.resolve() or (loose and path.parts[-2:] == lora.resolve().parts[-2:])


def find_gsb(lora: Path) -> list[tuple[Path, dict]]:
    """gsb.json files that compare ``lora``: in it, in its run folder or a folder of the run, or in a
    folder beside the run (there only when the recorded path resolves to ``lora``)."""
    run = lora.parent
    inside = [lora / "gsb.json", run / "gsb.json", *sorted(run.glob("*/gsb.json"))]
    beside = sorted(p for p in run.parent.glob("*/gsb.json") if p.parent != run)
    found = []
    for path, loose in [*((p, True) for p in dict.fromkeys(inside)), *((p, False) for p in beside)]:
        data = _read(path, json.loads)
        if isinstance(data, dict) and any(_names(data.get(k), lora, loose) for k in ("lora_a", "lora_b")):
            found.append((path, data))
    return found


def read_run_records(lora: str | Path) -> RunRecords:
    lora = Path(lora)
    return RunRecords(
        lora=lora,
        record=_read(lora / LORA_FAMILY_FILE, json.loads),
        config=_read(lora.parent / "config.yaml", yaml.safe_load),
        metrics=_read(lora.parent / "metrics.json", json.loads),
        gsb=find_gsb(lora),
    )


# ---------------------------------------------------------------- rendering


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _training_lines(config: dict | None) -> list[str]:
    if config is None:
        return ["- training config: none found (no config.yaml beside the LoRA folder)"]
    lines = []
    if "reward" in config:
        reward = config["reward"]
        models = reward.get("models") or [reward.get("model")]
        lines.append("- recipe: `zr finetune-t2i` (reward gradients through the sampler into the LoRA)")
        lines.append(f"- reward model(s): {', '.join(f'`{m}`' for m in models if m)}")
        for key in ("aggregate", "std_weight"):
            if reward.get(key) is not None:
                lines.append(f"- reward {key}: {_fmt(reward[key])}")
        dims, weights = reward.get("dimensions") or [], reward.get("weights")
        weights = weights or [1.0] * len(dims)
        lines.append("- dimensions and weights: " + ", ".join(f"{d} {w:g}" for d, w in zip(dims, weights)))
        sampler = config.get("sampler", {})
        shown = {k: v for k, v in sampler.items() if v is not None and not k.startswith("checkpoint_")}
        lines.append("- sampler: " + ", ".join(f"{k} {_fmt(v)}" for k, v in shown.items()))
        reg = config.get("reg_weight", 0)
        lines.append(
            f"- regulariser: L2 of the LoRA's denoiser output to the base's, weight {_fmt(reg)}"
            if reg
            else "- regulariser: off (reg_weight 0)"
        )
        judge = config.get("validation", {}).get("judge", {})
        if judge.get("path"):
            lines.append(f"- validation judge: {judge.get('kind')} `{judge['path']}`")
    elif "records" in config:
        lines.append("- recipe: `zr train-t2i-sft` (denoising loss on (prompt, image) records)")
        lines.append(f"- records: `{config['records']}`, min_score {_fmt(config.get('min_score'))}")
        lines.append(f"- image size: {config.get('height')}x{config.get('width')}")
    else:
        lines.append("- recipe: unknown (config.yaml has neither `reward` nor `records`)")
    run, optim, lora = config.get("run", {}), config.get("optim", {}), config.get("lora", {})
    lines.append(
        f"- steps: {run.get('max_steps')} (batch size {config.get('batch_size')}, lr {_fmt(optim.get('lr'))}), "
        f"LoRA rank {lora.get('rank')}, alpha {_fmt(lora.get('alpha'))}"
    )
    lines.append(f"- trained on pipeline: `{config.get('pipeline')}`")
    return lines


def _validation_lines(metrics: dict | None) -> list[str]:
    if metrics is None:
        return ["- validation: none found (no metrics.json beside the LoRA folder)"]
    entries = [e for e in metrics.get("validation", []) if isinstance(e, dict)]
    lines = []
    if not entries:
        lines.append("- validation: none found (metrics.json has no validation entries)")
    else:
        if len(entries) > MAX_VALIDATION_ROWS:  # evenly spaced rows, the last one always shown
            stride = len(entries) / (MAX_VALIDATION_ROWS - 1)
            entries = [entries[int(i * stride)] for i in range(MAX_VALIDATION_ROWS - 1)] + [entries[-1]]
        cols = [k for k, v in entries[-1].items() if isinstance(v, (int, float)) and k != "step"]
        lines += [
            "| step | " + " | ".join(cols) + " |",
            "|---|" + "---|" * len(cols),
            *(f"| {e.get('step')} | " + " | ".join(_fmt(e.get(c, "")) for c in cols) + " |" for e in entries),
        ]
    notes = {k: v for k, v in metrics.items() if k not in ("train", "validation", "final", "lora")}
    if notes:  # selection, warnings: whatever else the run recorded
        lines += ["", *(f"- {k}: {_fmt(v)}" for k, v in notes.items())]
    return lines


def _gsb_lines(found: list[tuple[Path, dict]]) -> list[str]:
    if not found:
        return ["- GSB: none found (no gsb.json of `zr eval-t2i` beside the LoRA that compares it)"]
    lines = []
    for path, g in found:
        judge = g.get("judge", {})
        lines.append(
            f"- GSB {g.get('label_a')} vs {g.get('label_b')}: {g.get('gsb', float('nan')):+.1%} "
            f"(G {g.get('good')}, S {g.get('same')}, B {g.get('bad')}; {g.get('n_items')} items; judge "
            f"{judge.get('kind')} `{judge.get('path')}`; `{path}`)"
        )
    return lines


def _front_matter(pipeline: str, family: str, lora_only: bool) -> str:
    meta = {
        "base_model": pipeline,
        "base_model_relation": "adapter" if lora_only else "finetune",
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": [*TAGS, family, "lora"],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n"


def render_card(pipeline: str, family: str, loras: list[str], lora_only: bool, dtype: str) -> str:
    """The model card of an export of ``pipeline`` with ``loras`` (fused, or merged into one LoRA)."""
    runs = [read_run_records(lora) for lora in loras]
    what = (
        f"One LoRA for the {family} pipeline `{pipeline}`, equal to the {len(loras)} LoRA(s) below "
        f"together (their factors stacked along the rank)."
        if lora_only
        else f"The {family} pipeline `{pipeline}` with the {len(loras)} LoRA(s) below fused into its "
        f"denoiser, in this order; weights in {dtype}, safetensors."
    )
    use = (
        f'pipe = DiffusionPipeline.from_pretrained("{pipeline}")\npipe.load_lora_weights("<this folder>")'
        if lora_only
        else 'pipe = DiffusionPipeline.from_pretrained("<this folder>")'
    )
    parts = [
        _front_matter(pipeline, family, lora_only),
        "# Reward-tuned text-to-image checkpoint (zr-diffusion)\n",
        f"{what} Written by `zr export` of zr-diffusion (Z-Reward, arXiv 2606.09076).\n",
        "## Use\n",
        f'```python\nfrom diffusers import DiffusionPipeline\n\n{use}\nimage = pipe("a red cube").images[0]\n```\n',
        "## LoRAs\n",
    ]
    for i, run in enumerate(runs, start=1):
        rank = run.record.get("rank") if run.record else "unknown"
        lines = [f"### {i}. `{run.lora}` (rank {rank})", "", *_training_lines(run.config)]
        lines += ["", "Validation (from the run's metrics.json):", "", *_validation_lines(run.metrics)]
        lines += ["", "GSB (from `zr eval-t2i`):", "", *_gsb_lines(run.gsb), ""]
        parts.append("\n".join(lines))
    return "\n".join(parts)
