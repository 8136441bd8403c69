"""What the six reward recipes share: the trainable policy, frozen teachers, record scoring helpers,
the final model folder, training-time HPA and the training loop (METHOD.md §2–5).

Recipes (``gdso.py``, ``risd.py``, ``baselines/*.py``) stay plain functions: they load their data,
call :func:`setup_policy`, write a ``step_fn(step, batch) -> {"loss": ..., ...}`` for one micro-batch
and hand it to :func:`run_training`. The loop owns seeding, sharding, accumulation, clipping,
logging, evaluation, checkpoints and the final save.

Multi-process (``accelerate launch``): the policy is prepared by accelerate (DDP wraps it), and the
scorer's ``__call__`` path goes through that wrapper (:class:`PreparedVLM`), so gradients are
all-reduced; vision-tower passes and ``generate`` use the unwrapped model directly (no trainable
parameter of a frozen vision tower needs syncing). Under DDP the step's loss is the mean over the
rank's records, DDP averages across ranks, so equal shards give the global-batch mean: two
processes take the same step as one process with the same global batch.

Dimension names: B records in a batch, U distinct images, S score bins, V vocabulary, T tokens.
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

from zr_diffusion.data import ScoredRecord, load_image, load_records
from zr_diffusion.io import atomic_write_json, write_dir_atomically
from zr_diffusion.scores import expected_score, gather_score_logits, score_distribution
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
from zr_diffusion.vlm.loading import load_vlm
from zr_diffusion.vlm.readout import Mode, SuffixReadout, VLMScorer

if TYPE_CHECKING:
    from zr_diffusion.reward.config import TrainRewardConfig

__all__ = [
    "ImageGroup",
    "Policy",
    "PreparedVLM",
    "StepFn",
    "TrainResult",
    "answer_logits",
    "check_batch_layout",
    "eval_hpa",
    "group_images",
    "load_frozen",
    "load_train_records",
    "load_eval_records",
    "record_suffix_readout",
    "run_training",
    "save_reward_model",
    "setup_policy",
    "student_score_logits",
    "teacher_probs",
]

StepFn = Callable[[int, list[int]], dict[str, torch.Tensor]]
EvalFn = Callable[[VLMScorer, int], dict[str, float]]


# --------------------------------------------------------------------------------------------------
# the trainable policy


@dataclass
class Policy:
    """The VLM being trained.

    model: the module that owns the trainable parameters and is handed to ``accelerator.prepare``:
        the ``PeftModel`` under LoRA, the VLM itself under full fine-tuning.
    vlm: the ``*ForConditionalGeneration`` model (LoRA layers injected in place under LoRA).
    processor: its processor.
    scorer: a :class:`VLMScorer` on ``vlm`` for forward passes WITH gradients; after
        :func:`run_training` prepares the model its ``model`` is a :class:`PreparedVLM`, so that
        forward passes go through the DDP wrapper (gradient all-reduce).
    plain_scorer: a :class:`VLMScorer` on the unwrapped ``vlm`` for work WITHOUT gradients
        (rollouts with ``generate_reasoning``, old log-probs, evaluation): no DDP collective runs, so
        ranks may call it a different number of times.
    params: the trainable parameters (float32).
    lora: whether LoRA adapters are trained.
    source: the folder or hub id the base weights came from.
    """

    model: torch.nn.Module
    vlm: torch.nn.Module
    processor: Any
    scorer: VLMScorer
    plain_scorer: VLMScorer
    params: list[torch.nn.Parameter]
    lora: bool
    source: str
    prepared: torch.nn.Module | None = None  # accelerate's wrapper of ``model`` (set by run_training)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Name -> detached CPU copy of every trainable parameter (names of :attr:`model`)."""
        return {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}


class PreparedVLM:
    """Stands in for the VLM inside a :class:`VLMScorer` after ``accelerator.prepare``.

    Calling it runs the prepared wrapper (DDP: gradient all-reduce; autocast under mixed precision);
    every attribute (``config``, ``model.get_image_features``, ``generate``, ...) is the VLM's own.
    """

    def __init__(self, prepared: torch.nn.Module, vlm: torch.nn.Module):
        object.__setattr__(self, "_prepared", prepared)
        object.__setattr__(self, "_vlm", vlm)

    def __call__(self, *args, **kwargs):
        return self._prepared(*args, **kwargs)

    def __getattr__(self, name: str):
        return getattr(self._vlm, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self._vlm, name, value)


def _language_model_linear_names(vlm: torch.nn.Module, targets: Sequence[str], vision: bool) -> list[str]:
    """Full module names of the ``nn.Linear`` layers whose last name part is in ``targets``, inside
    the language model (and the vision tower when ``vision``); ``lm_head`` is never adapted."""
    inner = vlm.model
    roots = [inner.language_model] + ([inner.visual] if vision else [])
    allowed = {id(m) for root in roots for m in root.modules()}
    names = [
        name
        for name, module in vlm.named_modules()
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] in targets and id(module) in allowed
    ]
    if not names:
        available = sorted(
            {
                n.split(".")[-1]
                for n, m in inner.language_model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise ValueError(
            f"lora.target_modules {list(targets)} match no linear layer of the language model; "
            f"its linear layers are named {available}"
        )
    return names


def setup_policy(cfg: TrainRewardConfig, accelerator, model_path: str | None = None) -> Policy:
    """Load ``cfg.model`` (or ``model_path``) as the trainable policy, on ``accelerator.device``.

    LoRA (``cfg.lora.enabled``): peft adapters on the language model's linear layers named in
    ``cfg.lora.target_modules`` (also the vision tower's when ``cfg.train_vision_tower``); every
    base weight is frozen. Full fine-tuning: the language model and ``lm_head`` train, the vision
    tower stays frozen unless ``cfg.train_vision_tower``. Trainable weights are float32 whatever
    ``cfg.dtype`` is (frozen weights keep ``cfg.dtype``). LoRA is initialised from ``cfg.run.seed``.
    """
    from zr_diffusion.vlm.loading import resolve_dtype

    source = str(model_path or cfg.model)
    vlm, processor = load_vlm(source, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code)
    vlm.requires_grad_(False)
    if cfg.gradient_checkpointing:
        vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        vlm.config.use_cache = False
    if cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig
        from peft import get_peft_model

        targets = _language_model_linear_names(vlm, cfg.lora.target_modules, cfg.train_vision_tower)
        peft_cfg = PeftLoraConfig(
            r=cfg.lora.rank,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=targets,
            bias="none",
        )
        torch.manual_seed(cfg.run.seed)
        model = get_peft_model(vlm, peft_cfg)
        vlm = model.get_base_model()  # the same object, LoRA layers injected in place
    else:
        model = vlm
        parts = [vlm.model.language_model, vlm.lm_head] + (
            [vlm.model.visual] if cfg.train_vision_tower else []
        )
        for part in parts:
            part.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.dtype != torch.float32:
            p.data = p.data.float()
    frozen_dtype = resolve_dtype(cfg.dtype)
    if frozen_dtype != torch.float32 and cfg.run.mixed_precision == "no":
        accelerator.print(
            f"note: frozen weights are {cfg.dtype} and trainable ones float32 without autocast; "
            f"set run.mixed_precision=bf16 for matched compute dtypes"
        )
    model.to(accelerator.device)
    model.train()
    grid = cfg.grid.build()
    scorer = VLMScorer(vlm, processor, grid)
    plain_scorer = VLMScorer(vlm, processor, grid, scorer.spec)
    n_train = sum(p.numel() for p in params)
    n_all = sum(p.numel() for p in model.parameters())
    accelerator.print(
        f"policy {source}: {'LoRA r=' + str(cfg.lora.rank) if cfg.lora.enabled else 'full fine-tuning'}, "
        f"{n_train:,} trainable of {n_all:,} parameters ({100 * n_train / max(n_all, 1):.3f}%)"
    )
    return Policy(model, vlm, processor, scorer, plain_scorer, params, cfg.lora.enabled, source)


def load_frozen(
    path: str | Path, cfg: TrainRewardConfig, device: torch.device | str | None = None
) -> VLMScorer:
    """A frozen scorer (teacher or reference): eval mode, no parameter requires grad, ``cfg.dtype``."""
    vlm, processor = load_vlm(path, dtype=cfg.dtype, device=device, trust_remote_code=cfg.trust_remote_code)
    vlm.requires_grad_(False)
    vlm.eval()
    return VLMScorer(vlm, processor, cfg.grid.build())


# --------------------------------------------------------------------------------------------------
# the final model folder


def _merged_state_dict(policy: Policy) -> dict[str, torch.Tensor]:
    """The VLM's state dict with every LoRA delta merged into its base weight, under the base names
    (as ``merge_and_unload`` would give), computed on the CPU without touching the policy."""
    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    lora_prefixes = []
    for name, module in policy.vlm.named_modules():
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            weight = base.weight.detach()
            delta = sum(module.get_delta_weight(a).detach() for a in module.active_adapters)
            out[f"{name}.weight"] = (weight.float() + delta.float()).to(weight.dtype).cpu()
            if getattr(base, "bias", None) is not None:
                out[f"{name}.bias"] = base.bias.detach().cpu()
            lora_prefixes.append(f"{name}.")
    for key, value in policy.vlm.state_dict().items():
        prefix = next((p for p in lora_prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value.detach().cpu()
    return out


def save_reward_model(policy: Policy, out_dir: str | Path) -> Path:
    """Write the trained reward model to ``out_dir``, atomically (the folder appears whole or not).

    The folder loads with ``ZRewardModel.from_pretrained`` and ``load_vlm``: safetensors weights
    with LoRA merged in (the policy itself is left unmerged) plus the processor. Under LoRA the
    adapter alone is also saved in ``out_dir/adapter`` (peft format, ``PeftModel.from_pretrained``).
    Call on the main process only.
    """

    def write(tmp: Path) -> None:
        if policy.lora:
            state = _merged_state_dict(policy)
            policy.vlm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            policy.model.save_pretrained(tmp / "adapter", safe_serialization=True)
        else:
            policy.vlm.save_pretrained(tmp, safe_serialization=True)
        policy.processor.save_pretrained(tmp)

    return write_dir_atomically(out_dir, write)


# --------------------------------------------------------------------------------------------------
# data


def load_train_records(cfg: TrainRewardConfig, require_rationale: bool = False) -> list[ScoredRecord]:
    """``cfg.data.train`` validated against the grid and dimensions; no records is an error."""
    records = load_records(
        cfg.data.train,
        grid=cfg.grid.build(),
        dimensions=cfg.data.dimensions,
        skip_bad=cfg.data.skip_bad,
        require_rationale=require_rationale,
    )
    if not records:
        raise ValueError(f"data.train: {cfg.data.train} has no records; give at least one scored record")
    return records


def load_eval_records(cfg: TrainRewardConfig) -> list[ScoredRecord]:
    """``cfg.data.eval`` (first ``max_eval_records``), or ``[]`` when no eval split is given."""
    if not cfg.data.eval:
        return []
    records = load_records(
        cfg.data.eval, grid=cfg.grid.build(), dimensions=cfg.data.dimensions, skip_bad=cfg.data.skip_bad
    )
    return records[: cfg.data.max_eval_records] if cfg.data.max_eval_records is not None else records


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
# scoring records


class ImageGroup(NamedTuple):
    """Records of one image size: the distinct images once, and which image each record shows."""

    positions: list[int]  # positions of these records in the caller's list
    images: torch.Tensor  # [U, 3, H, W] in [0, 1], each distinct image file once
    image_index: list[int]  # per record: which of the U images


def group_images(
    records: Sequence[ScoredRecord], device: torch.device | str | None = None
) -> list[ImageGroup]:
    """Load the records' images, grouped by size (one vision batch per size, each file loaded once)."""
    by_size: dict[tuple[int, int], tuple[list[int], list[Path], list[torch.Tensor], list[int]]] = {}
    loaded: dict[Path, torch.Tensor] = {}
    for pos, rec in enumerate(records):
        if rec.image not in loaded:
            loaded[rec.image] = load_image(rec.image)
        img = loaded[rec.image]
        positions, paths, tensors, index = by_size.setdefault(tuple(img.shape[-2:]), ([], [], [], []))
        if rec.image not in paths:
            paths.append(rec.image)
            tensors.append(img)
        positions.append(pos)
        index.append(paths.index(rec.image))
    return [
        ImageGroup(positions, torch.stack(tensors).to(device), index)
        for positions, _, tensors, index in by_size.values()
    ]


def answer_logits(scorer: VLMScorer, records: Sequence[ScoredRecord], mode: Mode = "student") -> torch.Tensor:
    """Full-vocabulary logits at each record's answer position (right after its prompt): ``[B, V]``.

    Student mode: the score position. One vision pass per distinct image; one language-model pass
    per image size. Gradients flow to the trainable parameters.
    """
    out: list[torch.Tensor | None] = [None] * len(records)
    for group in group_images(records, scorer.device):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        batch = scorer.inputs.batch(
            [r.prompt for r in recs], [r.dimension for r in recs], features.size, mode, device=scorer.device
        )
        logits = scorer.forward_logits(features.select(group.image_index), batch, logits_to_keep=1)[:, -1]
        for k, p in enumerate(group.positions):
            out[p] = logits[k]
    return torch.stack(out)  # [B, V]


def student_score_logits(scorer: VLMScorer, records: Sequence[ScoredRecord]) -> torch.Tensor:
    """Score-token logits in student mode: ``[B, S]`` (``q = softmax`` of these)."""
    return gather_score_logits(answer_logits(scorer, records, "student"), scorer.token_ids)


def record_suffix_readout(
    scorer: VLMScorer,
    records: Sequence[ScoredRecord],
    suffixes: Sequence[Sequence[int]],
    mode: Mode,
) -> SuffixReadout:
    """:meth:`VLMScorer.suffix_readout` for records of any image sizes, in record order.

    ``token_logprobs`` / ``token_mask`` are ``[B, T]`` with suffixes right-aligned (groups with
    shorter suffixes are left-padded with masked zeros).
    """
    if len(suffixes) != len(records):
        raise ValueError(f"got {len(suffixes)} suffixes for {len(records)} records; give one per record")
    parts: list[tuple[list[int], SuffixReadout]] = []
    for group in group_images(records, scorer.device):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        readout = scorer.suffix_readout(
            features,
            [r.prompt for r in recs],
            [r.dimension for r in recs],
            [list(suffixes[p]) for p in group.positions],
            image_index=group.image_index,
            mode=mode,
        )
        parts.append((group.positions, readout))
    t = max(r.token_logprobs.shape[1] for _, r in parts)
    n, s = len(records), parts[0][1].score_logits.shape[-1]
    ref = parts[0][1].token_logprobs
    logprobs = ref.new_zeros(n, t)
    mask = torch.zeros(n, t, dtype=torch.bool, device=ref.device)
    score_logits = ref.new_zeros(n, s)
    score_logprobs = ref.new_zeros(n, s)
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    for positions, r in parts:
        idx = torch.as_tensor(positions, device=ref.device)
        width = r.token_logprobs.shape[1]
        logprobs = logprobs.index_put((idx,), torch.nn.functional.pad(r.token_logprobs, (t - width, 0)))
        mask = mask.index_put((idx,), torch.nn.functional.pad(r.token_mask, (t - width, 0)))
        score_logits = score_logits.index_put((idx,), r.score_logits.to(ref.dtype))
        score_logprobs = score_logprobs.index_put((idx,), r.score_logprobs.to(ref.dtype))
    return SuffixReadout(logprobs, mask, score_logits, score_logprobs)


def teacher_rollouts(
    scorer: VLMScorer, records: Sequence[ScoredRecord], rollout, num_samples: int = 1
) -> list:
    """``num_samples`` sampled reasonings per record, teacher template (``rollout``: a RolloutConfig):
    ``[B][R]`` ReasoningSamples, each with q read after its score marker. One vision pass per image."""
    from zr_diffusion.vlm.readout import generate_reasoning

    out: list = [None] * len(records)
    for group in group_images(records, scorer.device):
        features = scorer.encode_images(group.images)
        recs = [records[p] for p in group.positions]
        samples = generate_reasoning(
            scorer,
            features.select(group.image_index),
            [r.prompt for r in recs],
            [r.dimension for r in recs],
            num_samples=num_samples,
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            max_new_tokens=rollout.max_new_tokens,
        )  # [B][R]
        for p, outs in zip(group.positions, samples):
            out[p] = outs
    return out


def teacher_probs(
    scorer: VLMScorer, records: Sequence[ScoredRecord], rollout, num_samples: int = 1
) -> torch.Tensor:
    """Teacher-mode score distributions ``[B, S]``, averaged over ``num_samples`` reasonings per record."""
    samples = teacher_rollouts(scorer, records, rollout, num_samples)
    return torch.stack([torch.stack([s.probs.float() for s in outs]).mean(0) for outs in samples])  # [B, S]


# --------------------------------------------------------------------------------------------------
# evaluation during training


@torch.no_grad()
def eval_hpa(
    scorer: VLMScorer,
    records: Sequence[ScoredRecord],
    dims: Sequence[str],
    batch_size: int,
    mode: Mode = "student",
    rollout=None,
) -> dict[str, float]:
    """μ of every record (of a dimension in ``dims``), then HPA (Eq. 17) over the same-prompt,
    same-dimension pairs with different annotated scores.

    ``mode="student"``: q at the score position right after the prompt (one output token).
    ``mode="teacher"``: one sampled reasoning per record (``rollout``: a RolloutConfig), q after the
    score marker; the global RNG drives the sampling.

    Returns ``{"hpa": ..., "pairs": P, "records": N}``; ``hpa`` is left out when there is
    no such pair. Uses :func:`zr_diffusion.reward.evaluate.hpa` for the metric.
    """
    from zr_diffusion.data import build_pairs
    from zr_diffusion.reward.evaluate import MetricUndefined, hpa

    records = [r for r in records if r.dimension in set(dims)]
    grid_values = scorer.grid.values()
    mu: dict[str, float] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        if mode == "student":
            probs = score_distribution(student_score_logits(scorer, chunk)).float().cpu()  # [B, S]
        else:
            probs = teacher_probs(scorer, chunk, rollout, num_samples=1).float().cpu()  # [B, S]
        for rec, m in zip(chunk, expected_score(probs, grid_values).tolist()):
            mu[rec.id] = m
    pairs = build_pairs(records)
    out: dict[str, float] = {"pairs": float(len(pairs)), "records": float(len(records))}
    with contextlib.suppress(MetricUndefined):
        out["hpa"] = hpa(
            [mu[p.w.id] for p in pairs],
            [mu[p.l.id] for p in pairs],
            [p.w.score for p in pairs],
            [p.l.score for p in pairs],
        )
    return out


def hpa_eval_fn(
    records: Sequence[ScoredRecord],
    dims: Sequence[str],
    batch_size: int,
    mode: Mode = "student",
    rollout=None,
) -> EvalFn | None:
    """An ``eval_fn`` for :func:`run_training` computing :func:`eval_hpa` (None when no records)."""
    if not records:
        return None
    return lambda scorer, step: eval_hpa(scorer, records, dims, batch_size, mode, rollout)


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
    if str(accelerator.distributed_type).endswith("FSDP"):
        raise ValueError(
            "the reward recipes do not run under FSDP: VLMScorer runs the vision tower outside the "
            "wrapped forward (one vision pass for all dimensions), where FSDP's parameters are still "
            "sharded; launch with configs/accelerate/ddp.yaml (LoRA) instead"
        )

    optimizer = build_optimizer(policy.params, cfg.optim)
    # The scheduler is not prepared: accelerate would step it once per process per optimizer step.
    scheduler = build_scheduler(optimizer, cfg.optim, run.max_steps)
    prepared, optimizer = accelerator.prepare(policy.model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    _register_trainable_checkpointing(accelerator, policy)
    if isinstance(prepared, torch.nn.parallel.DistributedDataParallel):
        # The VLM's buffers are constants (rotary frequencies); syncing them in every forward would be
        # a collective that ranks with different numbers of forward passes (image-size groups) skip.
        for attr in ("forward_sync_buffers", "broadcast_buffers"):
            if hasattr(prepared, attr):
                setattr(prepared, attr, False)
    policy.prepared = prepared
    policy.scorer.model = PreparedVLM(prepared, policy.vlm)

    start = 0
    if cfg.resume:
        start, _ = resume_from_checkpoint(accelerator, out)
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
        if accelerator.is_main_process:
            policy.model.eval()
            with torch.no_grad(), accelerator.autocast():
                row = {k: float(v) for k, v in eval_fn(policy.plain_scorer, step).items()}
            policy.model.train()
            history.eval.append({"step": step, **row})
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
            history.train.append({"step": done, **row})
            accelerator.log({f"train/{k}": v for k, v in row.items()}, step=done)
            if accelerator.is_main_process and hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=f"{row['loss']:.4f}")
        if run.eval_every and done % run.eval_every == 0 and done != run.max_steps:
            evaluate(done)
        if run.save_every and done % run.save_every == 0:
            if accelerator.is_main_process:  # the log so far, so that a resumed run continues it
                atomic_write_json(metrics_path, {"method": cfg.method, "steps": done, **history.as_dict()})
            save_checkpoint(accelerator, out, done, keep=run.keep_checkpoints)
            last_saved = done

    final = max(start, run.max_steps)
    evaluate(final)
    if last_saved != final:
        save_checkpoint(accelerator, out, final, keep=run.keep_checkpoints)

    checksums = accelerator.gather(
        torch.tensor([_checksum(policy.params)], dtype=torch.float64, device=accelerator.device)
    ).tolist()
    model_dir = out / "model"
    metrics = {
        "method": cfg.method,
        "steps": final,
        "train": history.train,
        "eval": history.eval,
        "final": (history.train[-1] if history.train else {})
        | ({f"eval_{k}": v for k, v in history.eval[-1].items() if k != "step"} if history.eval else {}),
        "processes": world,
        "rank_weight_checksums": checksums,
        "model_dir": str(model_dir),
    }
    if len({round(c, 6) for c in checksums}) > 1:
        accelerator.print(f"warning: the processes ended with different weights (checksums {checksums})")
    if accelerator.is_main_process:
        save_reward_model(policy, model_dir)
        atomic_write_json(metrics_path, metrics)
        accelerator.print(f"saved the reward model to {model_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainResult(final, metrics, policy, model_dir)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable parts (cache keys)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
