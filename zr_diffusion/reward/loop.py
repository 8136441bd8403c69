"""The reward recipes' training loop (METHOD.md §2–4).

Recipes (``gdso.py``, ``risd.py``, ``baselines/*.py``) stay plain functions: they load their data,
call :func:`~zr_diffusion.reward.policy.setup_policy`, write a ``step_fn(step, batch) -> {"loss": ...}``
for one micro-batch and hand it to :func:`run_training`. The loop owns seeding, sharding,
accumulation, clipping, logging, evaluation, checkpoints and the final save.

Under DDP the step's loss is the mean over the rank's records, DDP averages across ranks, so equal
shards give the global-batch mean: two processes take the same step as one process with the same
global batch. Under FSDP2 (:mod:`zr_diffusion.reward.sharding`) the policy is sharded in place
before the optimizer is built, gradients are reduce-scattered to the same mean, evaluation runs on
every rank (its forwards are collectives) and checkpoints hold whole trainable weights and optimizer
state (:class:`~zr_diffusion.reward.sharding.ShardedTrainState`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from zr_diffusion.io import atomic_write_json
from zr_diffusion.reward.clock import RunClock
from zr_diffusion.training import batch_indices as global_batch_indices
from zr_diffusion.training import (
    build_optimizer,
    build_scheduler,
    ensure_finite,
    init_trackers,
    latest_checkpoint,
    resume_from_checkpoint,
    save_checkpoint,
    seed_step,
    shard,
)
from zr_diffusion.training import progress as progress_bar

if TYPE_CHECKING:
    from zr_diffusion.reward.config import TrainRewardConfig


from zr_diffusion.reward.policy import Policy, PreparedVLM, save_reward_model
from zr_diffusion.reward.scoring import EvalFn
from zr_diffusion.reward.sharding import (
    ShardedTrainState,
    fsdp_plugin,
    full_tensor,
    gathered,
    shard_policy,
    uses_fsdp,
)

StepFn = Callable[[int, list[int]], dict[str, torch.Tensor]]


def check_batch_layout(batch_size: int, num_processes: int, grad_accum: int, what: str = "batch_size") -> int:
    """The per-process micro-batch size; a global batch that does not split evenly is an error."""
    if batch_size % num_processes:
        raise ValueError(
            f"{what}={batch_size} does not split over {num_processes} processes; "
            f"use a multiple of {num_processes}"
        )
    per_rank = batch_size // num_processes
    if per_rank % grad_accum:
        raise ValueError(
            f"{what}={batch_size} over {num_processes} process(es) gives {per_rank} per process, which "
            f"run.grad_accum={grad_accum} micro-batches cannot split evenly; make {what} a multiple of "
            f"{num_processes * grad_accum}"
        )
    return per_rank // grad_accum


# --------------------------------------------------------------------------------------------------
# the training loop


class TrainResult(NamedTuple):
    step: int  # optimizer steps done
    metrics: dict  # what metrics.json holds
    policy: Policy
    model_dir: Path  # the final model folder


@dataclass
class _History:
    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"train": self.train, "eval": self.eval}


def _register_trainable_checkpointing(accelerator, policy: Policy) -> None:
    """Checkpoints hold the trainable parameters only (not the frozen base: a 9B model would
    otherwise be rewritten at every checkpoint), under the names of ``policy.model``."""
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]

    def save_hook(models, weights, output_dir):
        for i, model in enumerate(models):
            if accelerator.unwrap_model(model) is policy.model and i < len(weights):
                params = dict(policy.model.named_parameters())
                weights[i] = {n: params[n].detach() for n in names}

    def load_hook(models, input_dir):
        from safetensors.torch import load_file

        for model in list(models):
            if accelerator.unwrap_model(model) is not policy.model:
                continue
            path = Path(input_dir) / "model.safetensors"
            if not path.is_file():
                raise FileNotFoundError(f"checkpoint {input_dir} has no model.safetensors")
            state = load_file(str(path))
            missing = sorted(set(names) - set(state))
            extra = sorted(set(state) - set(names))
            if missing or extra:
                raise ValueError(
                    f"checkpoint {input_dir} does not match this run's trainable parameters: "
                    f"missing {missing[:5]}, unexpected {extra[:5]}; resume with the same lora/model settings"
                )
            params = dict(policy.model.named_parameters())
            with torch.no_grad():
                for n in names:
                    params[n].copy_(state[n])
            models.remove(model)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _checksum(params: Sequence[torch.nn.Parameter]) -> float:
    """A float64 fingerprint of the trainable weights (equal weights give equal sums)."""
    total = torch.zeros((), dtype=torch.float64)
    for k, p in enumerate(params):
        total += (p.detach().double().cpu() * (1.0 + 1e-3 * k)).sum()
    return float(total)


def _all_finite(accelerator, losses: dict[str, torch.Tensor], step: int) -> None:
    """Stop every process before backward when any process has a non-finite loss term."""
    bad = sum(int(not torch.isfinite(v.detach()).all()) for v in losses.values())
    flag = torch.tensor([float(bad)], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if bad:
        for name, value in losses.items():
            ensure_finite(value, name, step)
    if float(flag) > 0:
        from zr_diffusion.training import NonFiniteLossError

        raise NonFiniteLossError(
            f"step {step}: another process had a non-finite loss; the optimizer step was skipped and "
            f"training stopped"
        )


def run_training(
    cfg: TrainRewardConfig,
    accelerator,
    policy: Policy,
    step_fn: StepFn,
    eval_fn: EvalFn | None = None,
    *,
    num_examples: int,
    batch_size: int | None = None,
) -> TrainResult:
    """The shared loop of every reward recipe.

    For each optimizer step ``step`` in ``[start, cfg.run.max_steps)``: the global RNGs are seeded
    from ``(seed, step, rank)``; the step's global batch of ``batch_size`` (default
    ``cfg.batch_size``) example indices in ``[0, num_examples)`` is drawn
    (:func:`zr_diffusion.training.batch_indices`), this process takes its shard and splits it into
    ``cfg.run.grad_accum`` micro-batches; ``step_fn(step, micro_batch)`` returns named scalar
    tensors including ``"loss"`` (the micro-batch mean), every one checked finite before backward.
    ``accelerator.backward`` divides by ``grad_accum``, so the step's gradient is that of the mean
    over the rank's shard; gradients sync across processes on the last micro-batch only.

    ``eval_fn(scorer, step)`` runs on the main process, in eval mode without gradients, on a scorer
    bound to the unwrapped model, every ``cfg.run.eval_every`` steps and at the end. Checkpoints
    (trainable weights + optimizer + scheduler + RNG, atomic) every ``cfg.run.save_every`` steps and
    at the end; ``cfg.resume`` continues from the newest one. The final model goes to
    ``<output_dir>/model`` and the logs to ``<output_dir>/metrics.json`` and TensorBoard.
    """
    from zr_diffusion.config import to_dict

    run = cfg.run
    out = Path(run.output_dir)
    batch_size = cfg.batch_size if batch_size is None else batch_size
    check_batch_layout(batch_size, accelerator.num_processes, run.grad_accum)
    if accelerator.gradient_accumulation_steps != run.grad_accum:
        raise ValueError(
            f"the accelerator accumulates {accelerator.gradient_accumulation_steps} micro-batches but "
            f"run.grad_accum={run.grad_accum}; build it with training.make_accelerator(cfg.run)"
        )
    if num_examples < 1:
        raise ValueError("the training set is empty")
    sharded = uses_fsdp(accelerator)
    if sharded:  # before the optimizer: it must hold the sharded parameters
        shard_policy(policy, fsdp_plugin(accelerator, run.mixed_precision))

    optimizer = build_optimizer(policy.params, cfg.optim)
    # The scheduler is not prepared: accelerate would step it once per process per optimizer step.
    scheduler = build_scheduler(optimizer, cfg.optim, run.max_steps)
    if sharded:  # sharded in place; accelerate's prepare would wrap it again (DDP on CPUs)
        prepared = policy.model
        accelerator.register_for_checkpointing(ShardedTrainState(policy.model, optimizer))
    else:
        prepared, optimizer = accelerator.prepare(policy.model, optimizer)
        _register_trainable_checkpointing(accelerator, policy)
    accelerator.register_for_checkpointing(scheduler)
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        # The VLM's buffers are constants (rotary frequencies); syncing them in every forward would be
        # a collective that ranks with different numbers of forward passes (image-size groups) skip.
        for attr in ("forward_sync_buffers", "broadcast_buffers"):
            if hasattr(prepared, attr):
                setattr(prepared, attr, False)
    policy.prepared = prepared
    policy.scorer.model = PreparedVLM(prepared, policy.vlm)

    start, state = 0, {}
    if cfg.resume:
        start, state = resume_from_checkpoint(accelerator, out)
    clock = RunClock(state)  # CPU and wall seconds, continued from the checkpoint
    if run.tensorboard:
        init_trackers(accelerator, f"reward-{cfg.method}", to_dict(cfg))
    history = _History()
    metrics_path = out / "metrics.json"
    if cfg.resume and metrics_path.is_file():
        old = json.loads(metrics_path.read_text())
        history.train = [r for r in old.get("train", []) if r["step"] <= start]
        history.eval = [r for r in old.get("eval", []) if r["step"] <= start]

    def evaluate(step: int) -> None:
        if eval_fn is None:
            return
        if accelerator.is_main_process or sharded:  # under FSDP every forward is a collective
            policy.model.eval()
            clock.start_eval()
            with torch.no_grad(), accelerator.autocast():
                row = {k: float(v) for k, v in eval_fn(policy.plain_scorer, step).items()}
            clock.stop_eval()
            policy.model.train()
            history.eval.append({"step": step, **row, **clock.elapsed()})
            accelerator.log({f"eval/{k}": v for k, v in row.items()}, step=step)
            accelerator.print(f"step {step}: eval " + ", ".join(f"{k}={v:.4f}" for k, v in row.items()))
        accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    per_micro = batch_size // world // run.grad_accum
    bar = progress_bar(
        range(start, run.max_steps),
        accelerator,
        total=run.max_steps,
        desc=f"train {cfg.method}",
        enabled=run.progress,
        initial=start,
    )
    policy.model.train()
    last_saved = start if latest_checkpoint(out) is not None and cfg.resume else -1
    tic = time.perf_counter()
    for step in bar:
        seed_step(run.seed, step, rank)
        indices = shard(global_batch_indices(num_examples, batch_size, run.seed, step), accelerator)
        sums: dict[str, float] = {}
        for micro in range(run.grad_accum):
            batch = indices[micro * per_micro : (micro + 1) * per_micro]
            last = micro == run.grad_accum - 1
            if sharded:  # FSDP2 accumulates unsharded gradients until the last micro-batch
                prepared.set_requires_gradient_sync(last)
                sync = contextlib.nullcontext()
            else:
                sync = contextlib.nullcontext() if last else accelerator.no_sync(prepared)
            with sync:
                with accelerator.autocast():
                    losses = step_fn(step, batch)
                if "loss" not in losses:
                    raise KeyError(
                        f"step_fn must return a dict with a 'loss' entry, got keys {sorted(losses)}"
                    )
                _all_finite(accelerator, losses, step)
                accelerator.backward(losses["loss"])
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / run.grad_accum
        grad_norm = None
        if cfg.optim.max_grad_norm is not None:
            if sharded:  # the norm over every rank's shards (a DTensor)
                norm = torch.nn.utils.clip_grad_norm_(policy.params, cfg.optim.max_grad_norm)
                grad_norm = full_tensor(norm)
            else:
                grad_norm = accelerator.clip_grad_norm_(policy.params, cfg.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1

        if done % run.log_every == 0 or done == run.max_steps:
            values = torch.tensor(list(sums.values()), device=accelerator.device, dtype=torch.float64)
            if world > 1:
                values = accelerator.reduce(values, reduction="mean")
            row = dict(zip(sums, values.tolist()))
            row["lr"] = scheduler.get_last_lr()[0]
            if grad_norm is not None:
                row["grad_norm"] = float(grad_norm)
            row["seconds_per_step"] = (time.perf_counter() - tic) / max(done - start, 1)
            row |= clock.elapsed()
            history.train.append({"step": done, **row})
            accelerator.log({f"train/{k}": v for k, v in row.items()}, step=done)
            if accelerator.is_main_process and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if run.eval_every and done % run.eval_every == 0 and done != run.max_steps:
            evaluate(done)
        if run.save_every and done % run.save_every == 0:
            if accelerator.is_main_process:  # the log so far, so that a resumed run continues it
                atomic_write_json(metrics_path, {"method": cfg.method, "steps": done, **history.as_dict()})
            save_checkpoint(accelerator, out, done, keep=run.keep_checkpoints, extra=clock.elapsed())
            last_saved = done

    final = max(start, run.max_steps)
    evaluate(final)
    if last_saved != final:
        save_checkpoint(accelerator, out, final, keep=run.keep_checkpoints, extra=clock.elapsed())

    model_dir = out / "model"
    with gathered(policy.model):  # FSDP: the full weights on every rank, for the checksum and the save
        trainable = [p for p in policy.model.parameters() if p.requires_grad]
        checksums = accelerator.gather(
            torch.tensor([_checksum(trainable)], dtype=torch.float64, device=accelerator.device)
        ).tolist()
        if accelerator.is_main_process:
            save_reward_model(policy, model_dir)
        accelerator.wait_for_everyone()
    metrics = {
        "method": cfg.method,
        "steps": final,
        "train": history.train,
        "eval": history.eval,
        "final": (history.train[-1] if history.train else {})
        | ({f"eval_{k}": v for k, v in history.eval[-1].items() if k != "step"} if history.eval else {}),
        "processes": world,
        "clock": clock.elapsed(),  # the whole run's seconds (main process), training and evaluation apart
        "fsdp": sharded,  # the policy was sharded with FSDP2 (fully_shard)
        "rank_weight_checksums": checksums,
        "model_dir": str(model_dir),
    }
    if len({round(c, 6) for c in checksums}) > 1:
        accelerator.print(f"warning: the processes ended with different weights (checksums {checksums})")
    if accelerator.is_main_process:
        atomic_write_json(metrics_path, metrics)
        accelerator.print(f"saved the reward model to {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(final, metrics, policy, model_dir)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
