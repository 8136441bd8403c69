"""``zr finetune-t2i``: reward-gradient LoRA tuning of a diffusers pipeline with Z-Reward (METHOD.md §6).

One optimizer step: the step's ``batch_size`` prompts (drawn with ``(seed, step)``) are split into
``run.grad_accum`` micro-batches and each micro-batch over the processes. Every process samples its
images with the differentiable sampler (noise from ``step_generator(seed, step, rank)``, so a resumed
run replays the same steps), scores them with the frozen Z-Reward model (or ensemble) and backpropagates

    loss = −mean_b R(p_b, I_b) + reg_weight · mean ‖f_LoRA(x_t, t) − f_base(x_t, t)‖²

through the decoder and the sampler's gradient window into the LoRA. The LoRA gradients are averaged
over processes, clipped, and the optimizer steps. Held-out validation with judges, the choice of
the best step and early stopping live in ``validation.py``. The helpers at the top (loading the
adapter, the LoRA checkpoint state, the gradient average) are shared with ``sft.py``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from zr_diffusion.config import save_config, to_dict
from zr_diffusion.io import atomic_save_safetensors, atomic_write_json, atomic_write_text
from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.base import T2IAdapter
from zr_diffusion.pipelines.config import micro_batch_size
from zr_diffusion.pipelines.prompts import load_prompts
from zr_diffusion.pipelines.sampler import SamplerConfig, sample
from zr_diffusion.pipelines.validation import Validator, validation_prompts
from zr_diffusion.training import (
    batch_indices,
    build_optimizer,
    build_scheduler,
    ensure_finite,
    init_trackers,
    make_accelerator,
    progress,
    resume_from_checkpoint,
    save_checkpoint,
    shard,
    step_generator,
)

if TYPE_CHECKING:
    from zr_diffusion.pipelines.config import FinetuneT2IConfig, T2ILoraConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- shared with sft.py / evaluate.py ------------------------------------------------------------


def check_xformers(device: torch.device) -> None:
    """enable_xformers needs the xformers package and a CUDA device; say which is missing."""
    missing = []
    if importlib.util.find_spec("xformers") is None:
        missing.append("the xformers package is not installed (pip install 'zr-diffusion[xformers]')")
    if torch.device(device).type != "cuda":
        missing.append(f"xformers attention needs a CUDA device, this run is on {device}")
    if missing:
        raise ValueError("enable_xformers=true, but " + "; ".join(missing) + ". Set enable_xformers=false.")


def load_t2i_adapter(
    pipeline: str,
    family: str | None,
    dtype: str,
    device: torch.device | str,
    enable_xformers: bool = False,
) -> T2IAdapter:
    """The pipeline at ``pipeline`` (folder or hub id) in its family's adapter, every weight frozen."""
    if enable_xformers:
        check_xformers(torch.device(device))
    try:
        adapter = load_adapter(pipeline, family=family, dtype=DTYPES[dtype], device=device)
    except OSError as e:  # a missing folder is looked up on the hub, which fails offline
        raise FileNotFoundError(
            f"pipeline {pipeline!r}: no such folder, and it did not load as a hub id ({type(e).__name__}: {e})"
        ) from None
    if enable_xformers:
        adapter.pipe.enable_xformers_memory_efficient_attention()
    return adapter


def add_lora(adapter: T2IAdapter, lora: T2ILoraConfig, seed: int, accelerator) -> list[torch.nn.Parameter]:
    """Add the trainable LoRA (float32) to the denoiser, identical on every process; returns its parameters.

    The LoRA A matrices are drawn from the global RNG, seeded here; rank 0's weights are then
    broadcast, since no DDP wrapper does it (see ``average_gradients``).
    """
    torch.manual_seed(seed)
    adapter.add_lora(rank=lora.rank, alpha=lora.alpha, targets=tuple(lora.target_modules) or None)
    params = adapter.lora_parameters()
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        with torch.no_grad():
            for p in params:
                p.copy_(broadcast(p.detach().clone(), from_process=0))
    return params


class LoraState:
    """The denoiser's LoRA weights as a checkpointable object (``accelerator.register_for_checkpointing``).

    The denoiser is not passed to ``accelerator.prepare`` (see ``average_gradients``), so its LoRA is
    saved and restored through this object.
    """

    def __init__(self, adapter: T2IAdapter):
        self.adapter = adapter

    def _params(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.adapter.denoiser.named_parameters() if "lora_" in n}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self._params().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        params = self._params()
        if set(state) != set(params):
            missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
            raise ValueError(
                f"checkpoint LoRA does not match this model: missing {missing[:3]}, unexpected {extra[:3]} "
                f"(was it saved with other lora.target_modules / lora.rank?)"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state[n].to(p.device, p.dtype))


def average_gradients(params: Sequence[torch.nn.Parameter], accelerator) -> None:
    """Average the LoRA gradients over processes with one flat all-reduce.

    The adapters call the bare denoiser and the sampler recomputes checkpointed calls during
    backward, so a DDP wrapper would never see the forward pass; the average is taken explicitly.
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")  # [N_lora]
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


def optimizer_step(params, optimizer, scheduler, accelerator, max_grad_norm: float | None) -> float | None:
    """Average gradients over processes, clip, step optimizer and schedule, clear gradients."""
    average_gradients(params, accelerator)
    norm = accelerator.clip_grad_norm_(params, max_grad_norm) if max_grad_norm is not None else None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return None if norm is None else float(norm)


def check_finite_everywhere(loss: torch.Tensor, accelerator, step: int) -> None:
    """``ensure_finite`` on every process's loss, so that all processes stop together."""
    ensure_finite(accelerator.gather(loss.detach().float().reshape(1)), "loss", step)


def dump_rank_lora(adapter: T2IAdapter, accelerator, output_dir: str | Path) -> None:
    """Debug: this process's LoRA weights to ``output_dir/rank{r}.safetensors``."""
    state = LoraState(adapter).state_dict()
    atomic_save_safetensors(state, Path(output_dir) / f"rank{accelerator.process_index}.safetensors")


class History:
    """``metrics.json``: per-step training logs and validations; a resumed run keeps steps <= its start."""

    def __init__(self, path: Path, start_step: int):
        self.path = path
        self.data: dict[str, list[dict]] = {"train": [], "validation": []}
        if start_step and path.is_file():
            old = json.loads(path.read_text())
            self.data = {k: [e for e in old.get(k, []) if e["step"] <= start_step] for k in self.data}

    def add(self, kind: str, entry: dict) -> None:
        self.data[kind].append(entry)

    def write(self, **extra) -> None:
        """``metrics.json`` (everything) and ``metrics.jsonl`` (one line per entry, by step, with its kind)."""
        atomic_write_json(self.path, {**self.data, **extra})
        rows = sorted(
            ((e["step"], i, {"kind": k, **e}) for i, k in enumerate(self.data) for e in self.data[k]),
            key=lambda r: r[:2],
        )
        atomic_write_text(self.path.with_suffix(".jsonl"), "".join(json.dumps(r[2]) + "\n" for r in rows))


# ---- the loss --------------------------------------------------------------------------------------


class LoraRun(NamedTuple):
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    start: int  # the first step to run (0, or the resumed checkpoint's step)
    history: History


def start_lora_run(accelerator, adapter: T2IAdapter, params, cfg, name: str) -> LoraRun:
    """Optimizer, schedule, resume and run records shared by the t2i LoRA recipes (``cfg`` has
    ``optim``, ``run`` and ``resume``)."""
    out_dir = Path(cfg.run.output_dir)
    raw_optimizer = build_optimizer(params, cfg.optim)
    # The schedule steps once per optimizer step, so it is kept out of accelerator.prepare (which
    # would step it once per process) and checkpointed as a registered object.
    scheduler = build_scheduler(raw_optimizer, cfg.optim, cfg.run.max_steps)
    optimizer = accelerator.prepare(raw_optimizer)
    accelerator.register_for_checkpointing(LoraState(adapter), scheduler)
    start = resume_from_checkpoint(accelerator, out_dir)[0] if cfg.resume else 0
    if start >= cfg.run.max_steps:
        raise ValueError(
            f"the checkpoint is at step {start}; raise run.max_steps (={cfg.run.max_steps}) to go on"
        )
    if accelerator.is_main_process:
        save_config(cfg, out_dir / "config.yaml")
    init_trackers(accelerator, name, to_dict(cfg))
    return LoraRun(optimizer, scheduler, start, History(out_dir / "metrics.json", start))


FINAL_LORA = "final"  # the last step's LoRA; validation's best/ sits beside it


def save_lora_checkpoint(
    accelerator, adapter: T2IAdapter, history: History, out_dir: Path, step: int, keep: int
) -> None:
    """The resumable state of ``step`` plus the LoRA (diffusers format) and the run records so far."""
    save_checkpoint(accelerator, out_dir, step, keep=keep)
    if accelerator.is_main_process:
        adapter.save_lora(out_dir / FINAL_LORA)
        history.write()
    accelerator.wait_for_everyone()


class RewardLossTerms(NamedTuple):
    loss: torch.Tensor  # [] −mean R + reg_weight · reg
    reward: torch.Tensor  # [B'] aggregated reward per image (B' = B · (1 + draft_lv))
    mu: torch.Tensor  # [B', D] expected score per dimension
    reg: torch.Tensor  # [] LoRA drift (0 when the regulariser is off)


def lora_drift(
    adapter: T2IAdapter,
    latents: torch.Tensor,
    prompts: list[str],
    negative_prompts: list[str] | None,
    guidance_scale: float | None,
    steps: Sequence[int],
    generator: torch.Generator,
) -> torch.Tensor:
    """Regulariser: mean squared difference of the (guided) denoiser output with and without the LoRA.

    latents [B, C, h, w] (the sampled latents, detached) are re-noised to the noise level of a step
    drawn from ``steps`` (the sampler's gradient window); both outputs are taken at these same inputs.
    Zero while the LoRA is zero (its B matrices start at zero).
    """
    t_index = steps[int(torch.randint(len(steps), (1,), generator=generator))]
    noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(latents.device)
    x_t = adapter.renoise(latents.detach().float(), t_index, noise)  # [B, C, h, w]
    cond = adapter.encode_prompts(prompts, negative_prompts, guidance_scale=guidance_scale)
    tuned = adapter.model_output(x_t, t_index, cond)  # [B, C, h, w]
    adapter.denoiser.disable_adapters()
    try:
        with torch.no_grad():
            base = adapter.model_output(x_t, t_index, cond)  # [B, C, h, w]
    finally:
        adapter.denoiser.enable_adapters()
    return F.mse_loss(tuned.float(), base.float())


def reward_loss(
    adapter: T2IAdapter,
    reward_model,
    prompts: list[str],
    sampler: SamplerConfig,
    generator: torch.Generator,
    negative_prompt: str | None = None,
    reg_weight: float = 0.0,
) -> RewardLossTerms:
    """Sample B images with gradients, score them, and form the loss of one micro-batch."""
    negative = [negative_prompt] * len(prompts) if negative_prompt is not None else None
    out = sample(adapter, prompts, sampler, generator=generator, negative_prompts=negative)
    # The frozen reward runs in its own dtype, outside the generator's autocast (run.mixed_precision).
    with torch.autocast(out.images.device.type, enabled=False):
        scored = reward_model(out.images, out.prompts)  # mu [B', D], reward [B']
    loss = -scored.reward.mean()
    reg = loss.new_zeros(())
    if reg_weight > 0:
        b = len(prompts)
        steps = out.info.grad_steps or [sampler.num_steps - 1]
        reg = lora_drift(
            adapter, out.latents[:b], prompts, negative, sampler.guidance_scale, steps, generator
        )
        loss = loss + reg_weight * reg
    return RewardLossTerms(loss=loss, reward=scored.reward, mu=scored.mu, reg=reg)


def train_step(
    step: int,
    prompts: list[str],
    adapter: T2IAdapter,
    reward_model,
    params: list[torch.nn.Parameter],
    optimizer,
    scheduler,
    accelerator,
    cfg: FinetuneT2IConfig,
) -> dict:
    """One optimizer step over the step's global batch; returns its logs, averaged over processes."""
    accum, device = cfg.run.grad_accum, accelerator.device
    micro = cfg.batch_size // accum
    generator = step_generator(cfg.run.seed, step, accelerator.process_index)  # this step's noise here
    indices = batch_indices(len(prompts), cfg.batch_size, cfg.run.seed, step)  # [batch_size]
    sums = torch.zeros(3, device=device)  # loss, reward, reg
    mu_sum = torch.zeros(len(reward_model.dimensions), device=device)  # [D]
    for m in range(accum):
        local = shard([prompts[i] for i in indices[m * micro : (m + 1) * micro]], accelerator)
        with accelerator.autocast():
            terms = reward_loss(
                adapter, reward_model, local, cfg.sampler, generator, cfg.negative_prompt, cfg.reg_weight
            )
        check_finite_everywhere(terms.loss, accelerator, step)
        accelerator.backward(terms.loss)
        sums += torch.stack([terms.loss, terms.reward.mean(), terms.reg]).detach().float() / accum
        mu_sum += terms.mu.detach().float().mean(0) / accum
    grad_norm = optimizer_step(params, optimizer, scheduler, accelerator, cfg.optim.max_grad_norm)
    loss, reward, reg = accelerator.reduce(sums, reduction="mean").tolist()
    mu = accelerator.reduce(mu_sum, reduction="mean").tolist()  # [D]
    logs = {"step": step + 1, "loss": loss, "reward": reward, "reg": reg}
    logs |= {f"mu/{d}": v for d, v in zip(reward_model.dimensions, mu)}
    return logs | {"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}


# ---- the recipe ------------------------------------------------------------------------------------


def finetune_t2i(cfg: FinetuneT2IConfig) -> dict:
    """Set up, train ``run.max_steps`` optimizer steps (fewer when validation patience runs out),
    save the LoRA (and the best validation step's in ``best/``); returns the final metrics."""
    # -- set up
    accelerator = make_accelerator(cfg.run)
    out_dir = Path(cfg.run.output_dir)
    prompts = load_prompts(cfg.prompts)
    val_prompts = validation_prompts(cfg.validation, prompts) if cfg.validation.enabled else None
    micro_batch_size(cfg.batch_size, cfg.run.grad_accum, accelerator.num_processes)
    device = accelerator.device
    adapter = load_t2i_adapter(cfg.pipeline, cfg.family, cfg.dtype, device, cfg.enable_xformers)
    params = add_lora(adapter, cfg.lora, cfg.run.seed, accelerator)
    reward_model = cfg.reward.build(device)
    optimizer, scheduler, start, history = start_lora_run(accelerator, adapter, params, cfg, "finetune_t2i")
    validator = None
    if val_prompts is not None:
        validator = Validator(cfg, adapter, reward_model, val_prompts, accelerator, history)
        validator.resume(start)
    accelerator.print(
        f"finetune-t2i: {adapter.family} pipeline {cfg.pipeline}, {sum(p.numel() for p in params):,} LoRA "
        f"weights, reward {', '.join(cfg.reward.sources)} on {list(cfg.reward.dimensions)}, "
        f"steps {start}..{cfg.run.max_steps}"
    )
    if validator is not None and start == 0 and validator.run(0).improved:  # the base model's values
        validator.keep_best(0)

    # -- train
    bar = progress(
        range(start, cfg.run.max_steps),
        accelerator,
        cfg.run.max_steps,
        "finetune-t2i",
        cfg.run.progress,
        start,
    )
    for step in bar:
        logs = train_step(
            step, prompts, adapter, reward_model, params, optimizer, scheduler, accelerator, cfg
        )
        completed = step + 1
        history.add("train", logs)
        if completed % cfg.run.log_every == 0 or completed == cfg.run.max_steps:
            accelerator.log(
                {f"train/{k}": v for k, v in logs.items() if k != "step" and v is not None}, step=completed
            )

        last = completed == cfg.run.max_steps
        improved = stop = False
        if validator is not None and validator.due(completed, last):
            improved, stop = validator.run(completed, last)
        # a new best step is checkpointed before best/ is written, so that a resume never loses it
        if (cfg.run.save_every and completed % cfg.run.save_every == 0) or last or stop or improved:
            save_lora_checkpoint(accelerator, adapter, history, out_dir, completed, cfg.run.keep_checkpoints)
        if improved:
            validator.keep_best(completed)
        if stop:
            break

    # -- save and clean up
    final = history.data["train"][-1] if history.data["train"] else {}
    if cfg.debug_rank_dumps:
        dump_rank_lora(adapter, accelerator, out_dir)
    if accelerator.is_main_process:
        summary = validator.summary() if validator is not None else {}
        history.write(final=final, lora=str(out_dir / FINAL_LORA), **summary)
        accelerator.print(
            f"finetune-t2i: LoRA in {out_dir / FINAL_LORA}, metrics in {out_dir / 'metrics.json'}, "
            f"checkpoints in {out_dir / 'checkpoints'}, validation grids in {out_dir / 'validation'}"
        )
        print_validation_summary(summary, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final


def print_validation_summary(summary: dict, accelerator) -> None:
    """The end-of-run lines: the kept step and why, early stopping, hacking warnings."""
    if summary.get("selection"):
        sel = summary["selection"]
        where = sel["lora"] or "no best/ folder (see the warning above)"
        accelerator.print(f"finetune-t2i: kept step {sel['step']} in {where}: {sel['reason']}")
    if summary.get("stopped_early"):
        stop = summary["stopped_early"]
        accelerator.print(f"finetune-t2i: stopped early at step {stop['step']}: {stop['reason']}")
    for w in summary.get("hacking_warnings", []):
        accelerator.print(f"finetune-t2i: WARNING: {w['message']}")
