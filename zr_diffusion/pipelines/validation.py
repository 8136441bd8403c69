"""Held-out validation of ``zr finetune-t2i``: watch for reward hacking, keep the best step, stop early.

The items are fixed (prompt, seed) pairs: the validation prompts x ``validation.seeds``, generated
from the same noise at every validation (``evaluate.generate``). Each validation scores them with

- the optimised reward: its aggregate ``reward``, ``mu/<d>`` per dimension and, for an ensemble,
  ``member/<m>`` per member;
- every judge of ``validation.judges``, models the run does not optimise: ``judge/<name>`` (the
  judge's aggregate) and, for a judge with several dimensions, ``judge/<name>/<d>``;

each value as the mean over the N items with its standard error ``<key>_se`` (``mean_and_se``).
Entries go to ``metrics.json`` / ``metrics.jsonl`` (``History``), TensorBoard (``val/<key>``), a grid
``validation/step-NNNNNNN.png`` and the curves ``validation.png``.

``validation.select_by`` (``reward`` or a judge name) keeps the LoRA of the best validation in
``output_dir/best`` (``select_best``; ties keep the earlier step); ``validation.patience`` stops the
run after that many validations without improvement; ``validation.keep_loras`` also keeps the LoRA
of every validation in ``validation/lora-step-NNNNNNN`` (``validation_lora_dir``). ``hacking_warnings`` compares each validation
with the first one of the run (the base model, step 0): the reward rose while a judge fell by more
than twice its standard error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from zr_diffusion.io import atomic_path, atomic_write_json
from zr_diffusion.pipelines.prompts import load_prompts

if TYPE_CHECKING:
    from zr_diffusion.pipelines.base import T2IAdapter
    from zr_diffusion.pipelines.config import FinetuneT2IConfig, ValidationConfig

BEST_DIR = "best"
BEST_RECORD = "selection.json"  # in best/: which validation step the LoRA is from
CURVES = "validation.png"


def validation_lora_dir(output_dir: str | Path, step: int) -> Path:
    """Where ``validation.keep_loras`` keeps the LoRA of the validation at ``step``."""
    return Path(output_dir) / "validation" / f"lora-step-{step:07d}"


# ---- statistics ------------------------------------------------------------------------------------


class Stat(NamedTuple):
    mean: float
    se: float  # standard error of the mean


def mean_and_se(values: torch.Tensor) -> Stat:
    """Mean of ``values [N]`` and its standard error ``s / √N`` (``s`` the sample std, divisor N − 1)."""
    if values.ndim != 1 or values.numel() < 2:
        raise ValueError(f"mean_and_se needs N >= 2 values [N], got shape {tuple(values.shape)}")
    v = values.double()
    return Stat(float(v.mean()), float(v.std() / math.sqrt(v.numel())))


class Selection(NamedTuple):
    step: int  # the best validation step
    value: float
    se: float
    since: int  # validations after ``step`` without improvement
    count: int  # validations seen


def select_best(entries: Sequence[dict], key: str) -> Selection | None:
    """The validation entry with the highest ``key`` (the earliest on ties); None before any."""
    best, since = None, 0
    for e in entries:
        if best is None or e[key] > best[1]:
            best, since = (e["step"], e[key], e[f"{key}_se"]), 0
        else:
            since += 1
    return None if best is None else Selection(*best, since=since, count=len(entries))


def hacking_warnings(first: dict, now: dict, judges: Sequence[str]) -> list[dict]:
    """Judges that fell by more than twice their standard error (at ``now``) while the reward rose."""
    if now["reward"] <= first["reward"]:
        return []
    out = []
    for name in judges:
        key = f"judge/{name}"
        drop, se = first[key] - now[key], now[f"{key}_se"]
        if drop > 2 * se:
            message = (
                f"possible reward hacking at step {now['step']}: the optimised reward rose "
                f"{first['reward']:.4f} -> {now['reward']:.4f} since step {first['step']}, while judge "
                f"{name!r} fell {first[key]:.4f} -> {now[key]:.4f}, more than twice its standard error "
                f"({se:.4f})"
            )
            out.append(
                {
                    "step": now["step"],
                    "since_step": first["step"],
                    "judge": name,
                    "reward": [first["reward"], now["reward"]],
                    "judge_value": [first[key], now[key]],
                    "judge_se": se,
                    "message": message,
                }
            )
    return out


# ---- scoring and drawing ---------------------------------------------------------------------------


@torch.no_grad()
def score_items(model, images: torch.Tensor, prompts: list[str], batch_size: int, device) -> dict:
    """Every output field but ``probs`` of ``model(images, prompts)``, batch by batch, on the CPU.

    images [N, 3, H, W] -> {"mu": [N, D], "reward": [N], ...} (an ensemble adds "members" [N, M]).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(prompts), batch_size):
        out = model(images[start : start + batch_size].to(device), prompts[start : start + batch_size])
        for k, v in out._asdict().items():
            if k != "probs":
                parts.setdefault(k, []).append(v.detach().float().cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def item_values(reward: dict, dimensions: Sequence[str], judged: dict[str, tuple[dict, Sequence[str]]]):
    """Per-item values [N] by metric key (see the module docstring for the keys)."""
    values = {"reward": reward["reward"]}
    values |= {f"mu/{d}": reward["mu"][:, i] for i, d in enumerate(dimensions)}
    if "members" in reward:
        values |= {f"member/{m}": reward["members"][:, m] for m in range(reward["members"].shape[1])}
    for name, (scores, dims) in judged.items():
        values[f"judge/{name}"] = scores["reward"]
        if len(dims) > 1:
            values |= {f"judge/{name}/{d}": scores["mu"][:, i] for i, d in enumerate(dims)}
    return values


def image_grid(images: torch.Tensor, nrow: int) -> torch.Tensor:
    """[N, 3, H, W] -> [3, H', W'], ``nrow`` images a row, a 2-pixel white border."""
    from torchvision.utils import make_grid

    return make_grid(images.float().cpu(), nrow=nrow, padding=2, pad_value=1.0)


def plot_curves(entries: Sequence[dict], judges: Sequence[str], path: Path, best_step: int | None) -> None:
    """``validation.png``: the reward (and its dimensions) and each judge against step, ± one SE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in entries]
    panels = [
        (
            "optimised reward",
            ["reward", *sorted(k for k in entries[0] if k.startswith("mu/") and not k.endswith("_se"))],
        )
    ]
    panels += [(f"judge {n}", [f"judge/{n}"]) for n in judges]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, keys) in zip(axes[0], panels):
        for key in keys:
            main = key == keys[0]
            ax.errorbar(
                steps,
                [e[key] for e in entries],
                yerr=[e[f"{key}_se"] for e in entries],
                label=key,
                lw=1.6 if main else 0.8,
                alpha=1.0 if main else 0.6,
                marker="o" if main else None,
                ms=3,
                capsize=2,
            )
        if best_step is not None:
            ax.axvline(best_step, ls="--", color="#888", lw=1, label=f"kept: step {best_step}")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


# ---- the validator used by finetune_t2i ------------------------------------------------------------


class Decision(NamedTuple):
    improved: bool  # this validation is the new best of select_by: checkpoint it, then keep_best
    stop: bool  # patience ran out: stop after this step


def validation_prompts(vcfg: ValidationConfig, train_prompts: list[str]) -> list[str]:
    """The first ``num_prompts`` of the validation prompt file (default: of the training prompts)."""
    prompts = (load_prompts(vcfg.prompts) if vcfg.prompts else train_prompts)[: vcfg.num_prompts]
    if len(prompts) * len(vcfg.seeds) < 2:
        raise ValueError(
            f"validation has {len(prompts)} prompt(s) x {len(vcfg.seeds)} seed(s) = 1 item; a standard "
            "error needs at least 2: add prompts to validation.prompts or seeds to validation.seeds"
        )
    return prompts


def build_judges(vcfg: ValidationConfig, device) -> dict[str, torch.nn.Module]:
    """Each configured judge, frozen, by name."""
    return {name: judge.build(device) for name, judge in vcfg.judges.items()}


class Validator:
    """Runs the validations of one ``finetune_t2i`` run; every process calls ``run`` and ``keep_best``,
    the main process generates, scores and writes."""

    def __init__(
        self, cfg: FinetuneT2IConfig, adapter: T2IAdapter, reward_model, prompts, accelerator, history
    ):
        self.cfg, self.vcfg = cfg, cfg.validation
        self.adapter, self.reward_model = adapter, reward_model
        self.prompts, self.accelerator, self.history = prompts, accelerator, history
        self.out_dir = Path(cfg.run.output_dir)
        self.key = None
        if self.vcfg.select_by is not None:
            self.key = "reward" if self.vcfg.select_by == "reward" else f"judge/{self.vcfg.select_by}"
        self.judges = build_judges(self.vcfg, accelerator.device) if accelerator.is_main_process else {}
        self.lost_best: int | None = None  # a resumed run whose best/ no longer holds the best step
        self.stopped_at: int | None = None

    @property
    def entries(self) -> list[dict]:
        return self.history.data["validation"]

    def due(self, completed: int, last: bool) -> bool:
        return last or bool(self.vcfg.every and completed % self.vcfg.every == 0)

    @torch.no_grad()
    def _validate(self, step: int) -> dict:
        from zr_diffusion.data import save_image
        from zr_diffusion.pipelines.evaluate import generate, items

        vcfg, device = self.vcfg, self.accelerator.device
        item_prompts = [p for p, _ in items(self.prompts, vcfg.seeds)]
        images = generate(
            self.adapter,
            self.prompts,
            vcfg.seeds,
            self.cfg.sampler,
            vcfg.batch_size,
            self.cfg.negative_prompt,
        )  # [N, 3, H, W], seed-major
        grid = self.out_dir / "validation" / f"step-{step:07d}.png"
        save_image(image_grid(images, nrow=len(self.prompts)), grid)
        reward = score_items(self.reward_model, images, item_prompts, vcfg.batch_size, device)
        judged = {
            name: (score_items(judge, images, item_prompts, vcfg.batch_size, device), list(judge.dimensions))
            for name, judge in self.judges.items()
        }
        entry = {"step": step, "grid": str(grid), "n_items": len(item_prompts)}
        for key, values in item_values(reward, self.reward_model.dimensions, judged).items():
            entry[key], entry[f"{key}_se"] = mean_and_se(values)
        return entry

    def run(self, step: int, last: bool = False) -> Decision:
        """Validate at ``step`` (main process), record, warn, decide; every process gets the decision.

        ``last``: the run ends here anyway, so patience does not count as an early stop.
        """
        acc = self.accelerator
        flags = torch.zeros(2, device=acc.device)
        if acc.is_main_process:
            entry = self._validate(step)
            if self.vcfg.keep_loras:
                entry["lora"] = str(self.adapter.save_lora(validation_lora_dir(self.out_dir, step)))
            entry["hacking_warnings"] = (
                hacking_warnings(self.entries[0], entry, list(self.judges)) if self.entries else []
            )
            self.history.add("validation", entry)
            best = select_best(self.entries, self.key) if self.key else None
            if best is not None:
                flags[0] = float(best.step == step)
                patience = self.vcfg.patience
                flags[1] = float(not last and patience is not None and best.since >= patience)
            acc.log({f"val/{k}": v for k, v in entry.items() if isinstance(v, float)}, step=step)
            self.history.write()
            plot_curves(self.entries, list(self.judges), self.out_dir / CURVES, best.step if best else None)
            line = f"step {step}: validation reward {entry['reward']:.4f} ± {entry['reward_se']:.4f}"
            line += "".join(
                f", {n} {entry[f'judge/{n}']:.4f} ± {entry[f'judge/{n}_se']:.4f}" for n in self.judges
            )
            acc.print(f"{line}; grid {entry['grid']}")
            for w in entry["hacking_warnings"]:
                acc.print(f"WARNING: {w['message']}")
        if acc.num_processes > 1:
            from accelerate.utils import broadcast

            flags = broadcast(flags, from_process=0)
        decision = Decision(improved=bool(flags[0]), stop=bool(flags[1]))
        if decision.stop:
            self.stopped_at = step
        return decision

    def keep_best(self, step: int) -> None:
        """Write the current LoRA (that of validation ``step``) to ``best/``; every process calls it."""
        if self.accelerator.is_main_process:
            self._write_best(step)
        self.accelerator.wait_for_everyone()

    def _write_best(self, step: int) -> None:
        self.adapter.save_lora(self.out_dir / BEST_DIR)
        atomic_write_json(
            self.out_dir / BEST_DIR / BEST_RECORD, {"step": step, "select_by": self.vcfg.select_by}
        )
        self.lost_best = None

    def resume(self, start: int) -> None:
        """After resuming at ``start``: make ``best/`` hold the best validation step of the kept history
        (main process; no collective call).

        The best step's LoRA is checkpointed before ``best/`` is written, so a step after the last
        checkpoint never owns ``best/``; a best step equal to ``start`` is rewritten from the restored
        weights.
        """
        best = select_best(self.entries, self.key) if self.key else None
        if best is None or not self.accelerator.is_main_process:
            return
        record = self.out_dir / BEST_DIR / BEST_RECORD
        held = json.loads(record.read_text())["step"] if record.is_file() else None
        if held == best.step:
            return
        if best.step == start:
            self._write_best(start)
            return
        self.lost_best = best.step
        self.accelerator.print(
            f"WARNING: {self.out_dir / BEST_DIR} holds step {held}, not step {best.step}, the best "
            f"validation before the resumed step {start}; its LoRA is gone (a checkpoint was removed?)"
        )

    def summary(self) -> dict:
        """What goes into metrics.json at the end: the kept step and why, early stopping, warnings."""
        warnings = [w for e in self.entries for w in e.get("hacking_warnings", [])]
        out: dict = {"hacking_warnings": warnings, "selection": None, "stopped_early": None}
        if self.stopped_at is not None:
            out["stopped_early"] = {
                "step": self.stopped_at,
                "patience": self.vcfg.patience,
                "reason": f"{self.vcfg.patience} validation(s) without improvement of {self.key}",
            }
        best = select_best(self.entries, self.key) if self.key else None
        if best is not None:
            steps = [e["step"] for e in self.entries]
            reason = (
                f"step {best.step} has the highest {self.key} ({best.value:.4f} ± {best.se:.4f} SE) of "
                f"{best.count} validations (steps {steps[0]}..{steps[-1]}); "
                f"{best.since} later validation(s) did not improve on it"
            )
            if self.stopped_at is not None:
                reason += (
                    f"; training stopped early at step {self.stopped_at} (patience {self.vcfg.patience})"
                )
            lora = None if self.lost_best is not None else str(self.out_dir / BEST_DIR)
            out["selection"] = {
                "select_by": self.vcfg.select_by,
                "key": self.key,
                "step": best.step,
                "value": best.value,
                "se": best.se,
                "lora": lora,
                "reason": reason,
            }
        return out
