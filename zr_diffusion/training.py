"""What every training recipe shares: run settings, the accelerator, per-step seeding, checkpoints
(written atomically, resumable), learning-rate schedules, the non-finite-loss guard and logging.

Recipes stay plain functions (STYLE.md); they call these helpers, they do not inherit from a trainer.
Resume is exact: each step draws its batch and its sampling noise from a generator seeded by
``(seed, step, rank)``, so a resumed run replays the same steps an uninterrupted run would take.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from zr_diffusion.io import atomic_write_json

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")


@dataclass
class OptimConfig:
    """Optimiser and schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0  # gradient clipping; None turns it off

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"optim.max_grad_norm must be > 0 or null, got {self.max_grad_norm}")


@dataclass
class RunConfig:
    """Where a run writes, how long it runs, and how often it evaluates, checkpoints and logs."""

    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: int = 100  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only at the end
    log_every: int = 1
    keep_checkpoints: int = 2
    tensorboard: bool = True
    progress: bool = True  # tqdm bar on the main process
    device: str | None = None  # None: accelerate picks (cuda if present); "cpu" forces the CPU

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"run.{name} must be >= 0 (0 = only at the end), got {getattr(self, name)}")


@dataclass
class LoraConfig:
    """LoRA adapter settings (peft). ``enabled: false`` means full fine-tuning."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.enabled and not self.target_modules:
            raise ValueError("lora.target_modules must name at least one module type when lora is enabled")


@dataclass
class TrainState:
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


class NonFiniteLossError(FloatingPointError):
    """A loss was NaN or infinite; the optimizer step was not taken."""


def ensure_finite(loss: torch.Tensor, name: str, step: int | str | None = None) -> None:
    """Stop before ``backward`` when ``loss`` is NaN/inf, so such a loss never reaches the optimizer."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLossError(
            f"{'' if step is None else f'step {step}: '}loss term {name!r} is {loss.detach().float().tolist()}; the optimizer step was "
            f"skipped and training stopped. Lower optim.lr, check the data, or use mixed_precision=no."
        )


def make_accelerator(run: RunConfig):
    """An ``accelerate.Accelerator`` for the run; mixed precision that the device cannot do is an error."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    cpu = run.device == "cpu" or not torch.cuda.is_available()
    if run.mixed_precision == "fp16" and cpu:
        raise ValueError("run.mixed_precision=fp16 needs a CUDA device; use bf16 or no on the CPU")
    if run.mixed_precision == "bf16" and not cpu and not torch.cuda.is_bf16_supported():
        raise ValueError("run.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
    project = ProjectConfiguration(project_dir=run.output_dir, logging_dir=str(Path(run.output_dir) / "logs"))
    acc = Accelerator(
        gradient_accumulation_steps=run.grad_accum,
        mixed_precision=run.mixed_precision,
        cpu=run.device == "cpu",
        log_with="tensorboard" if run.tensorboard else None,
        project_config=project,
    )
    return acc


def init_trackers(accelerator, name: str, config: dict) -> None:
    flat = {k: v for k, v in _flatten(config).items() if isinstance(v, (int, float, str, bool))}
    accelerator.init_trackers(name, config=flat)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def step_generator(
    seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A generator for one step's randomness; the same (seed, step, rank) always gives the same draws."""
    g = torch.Generator(device=device)
    g.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))
    return g


def seed_step(seed: int, step: int, rank: int = 0) -> None:
    """Seed the global RNGs for one step (sampling inside ``model.generate`` uses them)."""
    torch.manual_seed((seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63 - 1))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The dataset indices of one step's global batch: a fresh permutation per epoch, seeded."""
    if n < 1:
        raise ValueError("the training set is empty")
    per_epoch = max(n // batch_size, 1)
    epoch, offset = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=step_generator(seed, epoch, rank=7)).tolist()
    perm = perm * math.ceil(batch_size / n) if batch_size > n else perm
    return perm[offset * batch_size : offset * batch_size + batch_size]


def shard(items: list, accelerator) -> list:
    """This process's share of a global batch (contiguous slices, equal sizes)."""
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(items) % world:
        raise ValueError(
            f"the global batch of {len(items)} does not split over {world} processes; "
            f"make the batch size a multiple of the number of processes"
        )
    size = len(items) // world
    return items[rank * size : (rank + 1) * size]


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters: check lora.target_modules or the freezing settings")
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(total_steps - cfg.warmup_steps, 1)
        progress = min(max(progress, 0.0), 1.0)
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---- checkpoints -------------------------------------------------------------------------------


def checkpoint_dir(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    root = checkpoint_dir(output_dir)
    if not root.is_dir():
        return None
    found = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_RE.match(p.name)))
    return found[-1][1] if found else None


def save_checkpoint(
    accelerator, output_dir: str | Path, step: int, keep: int = 2, extra: dict | None = None
) -> Path:
    """Save the accelerate state (model, optimizer, scheduler, RNG) for ``step``, atomically.

    Every process takes part in ``save_state`` (DeepSpeed/FSDP shard their state) into a temporary
    folder; the main process then renames it into place and prunes old checkpoints.
    """
    import os

    root = checkpoint_dir(output_dir)
    path = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", {"step": step, **(extra or {})})
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        old = sorted(p for p in root.iterdir() if CHECKPOINT_RE.match(p.name))
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def resume_from_checkpoint(accelerator, output_dir: str | Path) -> tuple[int, dict]:
    """Load the newest checkpoint of ``output_dir``; returns (step, trainer_state). No checkpoint is an error."""
    path = latest_checkpoint(output_dir)
    if path is None:
        raise FileNotFoundError(
            f"resume asked, but {checkpoint_dir(output_dir)} has no checkpoint (step-NNNNNNN)"
        )
    accelerator.load_state(str(path))
    state = json.loads((path / "trainer_state.json").read_text())
    accelerator.print(f"resumed from {path} (step {state['step']})")
    return int(state["step"]), state


def progress(
    iterable: Iterable,
    accelerator,
    total: int | None = None,
    desc: str = "",
    enabled: bool = True,
    initial: int = 0,
) -> Iterator:
    from tqdm.auto import tqdm

    return iter(
        tqdm(
            iterable,
            total=total,
            desc=desc,
            initial=initial,
            disable=not (enabled and accelerator.is_main_process),
            dynamic_ncols=True,
        )
    )


def trainable_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
