"""``zr train-t2i-sft``: LoRA on a diffusers denoiser with the ordinary denoising loss on (prompt, image).

Per family (keyed by ``adapter.family``):

- SD / SDXL (DDPM noise schedule): ``t ~ U{0..T_train-1}``, ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε``; the target
  is ``ε`` (epsilon), ``√ᾱ_t ε − √(1−ᾱ_t) x0`` (v_prediction) or ``x0`` (sample).
- Flux.1 / Z-Image (flow matching): ``σ ~ U(0, 1)``, ``x_σ = (1−σ) x0 + σ ε``; the target is the
  velocity ``ε − x0`` (the adapters' convention: ``x0 = x_σ − σ v``).

Loss = mean squared error between the denoiser output and the target. Images are VAE-encoded (the
posterior is sampled with the step's generator) and scaled into the denoiser's latent space.
Batches, noise and resume follow ``reward_finetune``: everything random in a step comes from
``(seed, step, rank)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from zr_diffusion.data import DataError, load_image, load_records
from zr_diffusion.pipelines.base import T2IAdapter
from zr_diffusion.pipelines.config import micro_batch_size
from zr_diffusion.pipelines.reward_finetune import (
    FINAL_LORA,
    add_lora,
    check_finite_everywhere,
    load_t2i_adapter,
    optimizer_step,
    save_lora_checkpoint,
    start_lora_run,
)
from zr_diffusion.training import (
    batch_indices,
    make_accelerator,
    progress,
    shard,
    step_generator,
)

if TYPE_CHECKING:
    from zr_diffusion.pipelines.config import SFTT2IConfig

DDPM_FAMILIES = ("sd", "sdxl")
FLOW_FAMILIES = ("flux", "zimage")
MINIMAL_KEYS = ("id", "prompt", "image")


class SFTExample(NamedTuple):
    prompt: str
    image: Path
    score: float | None  # mean annotated score (scored records), None for minimal records


# ---- records -------------------------------------------------------------------------------------


def _first_row(path: Path) -> dict | None:
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    return None
                return row if isinstance(row, dict) else None
    return None


def _load_minimal(path: Path) -> list[SFTExample]:
    examples, problems = [], []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{where}: not valid JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                problems.append(f"{where}: a record must be a JSON object, got {type(row).__name__}")
                continue
            unknown = sorted(set(row) - set(MINIMAL_KEYS))
            if unknown:
                problems.append(
                    f"{where}: unknown field(s) {unknown}; a minimal record has {list(MINIMAL_KEYS)}"
                )
                continue
            if not all(isinstance(row.get(k), str) and row[k] for k in ("prompt", "image")):
                problems.append(f'{where}: "prompt" and "image" must be non-empty strings, got {row!r}')
                continue
            image = Path(row["image"])
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                problems.append(f"{where}: image file {image} does not exist")
                continue
            examples.append(SFTExample(row["prompt"], image, None))
    if problems:
        raise DataError(problems)
    return examples


def load_sft_examples(
    path: str | Path, min_score: float | None = None, score_dimensions: tuple[str, ...] | None = None
) -> list[SFTExample]:
    """(prompt, image) examples from a scored-record JSONL or a minimal ``{prompt, image}`` JSONL.

    Scored records of the same (prompt, image) (one per dimension) become one example whose score
    is the mean over ``score_dimensions`` (None: all its dimensions); ``min_score`` keeps examples
    with score >= min_score.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"records file {path} does not exist")
    if path.suffix != ".jsonl":
        raise DataError([f"{path}: unsupported records file type {path.suffix!r}; use .jsonl"])
    first = _first_row(path)
    scored = first is not None and any(k in first for k in ("dimension", "score", "scores"))
    if not scored:
        if min_score is not None:
            raise ValueError(
                f"min_score={min_score} needs scored records (prompt, image, dimension, score); "
                f"{path} holds minimal {{prompt, image}} records"
            )
        examples = _load_minimal(path)
    else:
        scores: dict[tuple[str, Path], list[float]] = {}
        for r in load_records(path):
            key = (r.prompt, r.image)
            scores.setdefault(key, [])
            if score_dimensions is None or r.dimension in score_dimensions:
                scores[key].append(r.score)
        examples = [SFTExample(p, im, sum(s) / len(s) if s else None) for (p, im), s in scores.items()]
        if min_score is not None:
            kept = [e for e in examples if e.score is not None and e.score >= min_score]
            if not kept:
                known = [e.score for e in examples if e.score is not None]
                span = f"{min(known)}..{max(known)}" if known else "none on the chosen dimensions"
                raise ValueError(
                    f"no image of {path} has a mean score >= min_score={min_score} (scores: {span})"
                )
            examples = kept
    if not examples:
        raise DataError([f"{path}: no records"])
    return examples


# ---- latents and the denoising loss --------------------------------------------------------------


def scale_latents(adapter: T2IAdapter, z: torch.Tensor) -> torch.Tensor:
    """VAE latents -> denoiser latents: the inverse of ``adapter.unscale_latents``. [B, C, h, w]."""
    config = adapter.vae.config
    if adapter.family in FLOW_FAMILIES:
        return (z - (config.shift_factor or 0.0)) * config.scaling_factor
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:  # SDXL-style per-channel normalisation
        mean = torch.tensor(mean, device=z.device).view(1, -1, 1, 1)
        std = torch.tensor(std, device=z.device).view(1, -1, 1, 1)
        return (z - mean) * config.scaling_factor / std
    return z * config.scaling_factor


@torch.no_grad()
def encode_images(adapter: T2IAdapter, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> [B, C, h, w] denoiser latents (a sample of the VAE posterior)."""
    return scale_latents(adapter, adapter.encode(images, generator))


def noise_and_target(
    adapter: T2IAdapter, x0: torch.Tensor, generator: torch.Generator, timesteps: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents [B, C, h, w], timesteps [B], target [B, C, h, w]) for the family's training loss.

    timesteps [B] in the adapter's units (DDPM: integer t; flow: σ · T_train); drawn uniformly when None.
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
    n_train = adapter.scheduler.config.num_train_timesteps
    if adapter.family in DDPM_FAMILIES:
        sched = adapter.scheduler
        t = torch.randint(0, n_train, (b,), generator=generator) if timesteps is None else timesteps
        t = t.long().to(x0.device)
        noisy = sched.add_noise(x0, noise, t)
        kind = sched.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = sched.get_velocity(x0, noise, t)
        else:  # "sample"
            target = x0
        return noisy, t, target
    if adapter.family in FLOW_FAMILIES:
        sigma = torch.rand(b, generator=generator) if timesteps is None else timesteps.float().cpu() / n_train
        sigma = sigma.to(x0.device)  # [B]
        s = sigma.view(b, 1, 1, 1)
        noisy = (1 - s) * x0 + s * noise
        return noisy, sigma * n_train, noise - x0
    raise ValueError(f"no SFT loss for family {adapter.family!r}; valid: {DDPM_FAMILIES + FLOW_FAMILIES}")


def denoising_loss(
    adapter: T2IAdapter,
    images: torch.Tensor,
    prompts: list[str],
    generator: torch.Generator,
    flux_guidance: float | None = None,
) -> torch.Tensor:
    """MSE between the denoiser output and the family's target on ``images [B, 3, H, W]``; a scalar."""
    x0 = encode_images(adapter, images, generator)  # [B, C, h, w]
    noisy, t, target = noise_and_target(adapter, x0, generator)
    # Guidance off for training: no CFG for SD/SDXL (1.0) and Z-Image (0.0); Flux.1-dev is
    # guidance-distilled and takes the guidance value as an embedding input (None: its default).
    guidance = {"sd": 1.0, "sdxl": 1.0, "zimage": 0.0, "flux": flux_guidance}[adapter.family]
    cond = adapter.encode_prompts(prompts, None, guidance_scale=guidance)
    pred = adapter.model_output_at(noisy, t, cond)  # [B, C, h, w]
    return F.mse_loss(pred.float(), target.float())


# ---- the recipe ------------------------------------------------------------------------------------


def train_t2i_sft(cfg: SFTT2IConfig) -> dict:
    """Set up, train ``run.max_steps`` optimizer steps, save the LoRA; returns the final metrics."""
    # -- set up
    accelerator = make_accelerator(cfg.run)
    out_dir = Path(cfg.run.output_dir)
    examples = load_sft_examples(cfg.records, cfg.min_score, cfg.score_dimensions)
    micro = micro_batch_size(cfg.batch_size, cfg.run.grad_accum, accelerator.num_processes, "records")
    adapter = load_t2i_adapter(cfg.pipeline, cfg.family, cfg.dtype, accelerator.device, cfg.enable_xformers)
    adapter.latent_shape(1, cfg.height, cfg.width)  # image size check, with the family's message
    params = add_lora(adapter, cfg.lora, cfg.run.seed, accelerator)
    optimizer, scheduler, start, history = start_lora_run(accelerator, adapter, params, cfg, "train_t2i_sft")
    accelerator.print(
        f"train-t2i-sft: {adapter.family} pipeline {cfg.pipeline}, {len(examples)} (prompt, image) examples, "
        f"{sum(p.numel() for p in params):,} LoRA weights, steps {start}..{cfg.run.max_steps}"
    )

    # -- train
    rank = accelerator.process_index
    bar = progress(
        range(start, cfg.run.max_steps),
        accelerator,
        cfg.run.max_steps,
        "train-t2i-sft",
        cfg.run.progress,
        start,
    )
    for step in bar:
        generator = step_generator(cfg.run.seed, step, rank)
        indices = batch_indices(len(examples), cfg.batch_size, cfg.run.seed, step)  # [batch_size]
        loss_sum = 0.0
        for m in range(cfg.run.grad_accum):
            local = shard([examples[i] for i in indices[m * micro : (m + 1) * micro]], accelerator)
            images = torch.stack(
                [load_image(e.image, (cfg.height, cfg.width)) for e in local]
            )  # [b, 3, H, W]
            with accelerator.autocast():
                loss = denoising_loss(
                    adapter, images, [e.prompt for e in local], generator, cfg.flux_guidance
                )
            check_finite_everywhere(loss, accelerator, step)
            accelerator.backward(loss)
            loss_sum += float(loss.detach()) / cfg.run.grad_accum
        grad_norm = optimizer_step(params, optimizer, scheduler, accelerator, cfg.optim.max_grad_norm)
        completed = step + 1

        loss_mean = float(
            accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), reduction="mean")
        )
        logs = {
            "step": completed,
            "loss": loss_mean,
            "lr": scheduler.get_last_lr()[0],
            "grad_norm": grad_norm,
        }
        history.add("train", logs)
        if completed % cfg.run.log_every == 0 or completed == cfg.run.max_steps:
            accelerator.log(
                {f"train/{k}": v for k, v in logs.items() if k != "step" and v is not None}, step=completed
            )
        if (cfg.run.save_every and completed % cfg.run.save_every == 0) or completed == cfg.run.max_steps:
            save_lora_checkpoint(accelerator, adapter, history, out_dir, completed, cfg.run.keep_checkpoints)

    # -- save and clean up
    final = history.data["train"][-1] if history.data["train"] else {}
    if accelerator.is_main_process:
        history.write(final=final, lora=str(out_dir / FINAL_LORA))
        accelerator.print(
            f"train-t2i-sft: LoRA in {out_dir / FINAL_LORA}, metrics in {out_dir / 'metrics.json'}, "
            f"checkpoints in {out_dir / 'checkpoints'}"
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return final
