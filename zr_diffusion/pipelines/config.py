"""Configs of the text-to-image recipes: ``zr finetune-t2i``, ``zr train-t2i-sft`` and ``zr eval-t2i``.

One dataclass per recipe (filled by ``zr_diffusion.config.load_config``); sections shared with the
other recipes come from ``training`` (run, optim, LoRA) and ``pipelines.sampler`` (sampling).
Invariants are checked at construction and the message says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from zr_diffusion.pipelines.sampler import SamplerConfig
from zr_diffusion.rubric import DEFAULT_DIMENSIONS, check_dimensions
from zr_diffusion.training import LoraConfig, OptimConfig, RunConfig

Family = Literal["sd", "sdxl", "flux", "zimage"]
Dtype = Literal["float32", "bfloat16", "float16"]
JudgeKind = Literal["zreward", "openclip", "clipscore"]


@dataclass
class T2ILoraConfig(LoraConfig):
    """LoRA on the denoiser (UNet or transformer); the base and every other component stay frozen.

    ``target_modules`` empty: the family adapter's ``default_lora_targets`` (the attention
    projections). ``alpha`` / ``rank`` is the LoRA scale. Full fine-tuning and LoRA dropout are not
    offered by the adapters.
    """

    rank: int = 4  # AlignProp / DRaFT use small ranks on the attention projections
    alpha: float = 4.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.enabled:
            raise ValueError("lora.enabled must be true: the t2i recipes train a LoRA on the denoiser only")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if self.dropout != 0:
            raise ValueError(
                f"lora.dropout must be 0 for the denoiser LoRA (adapter.add_lora), got {self.dropout}"
            )


@dataclass
class RewardConfig:
    """The frozen Z-Reward model(s) whose aggregate ``R = Σ_d w_d μ_d`` is maximised (METHOD.md §6).

    One model (``model``) or an ensemble (``models``): every member scores ``dimensions`` with
    ``weights`` through its own processor, and the member rewards are combined per image by
    ``aggregate`` (``mean``, ``min``, or ``mean_minus_std`` = mean − ``std_weight`` · std over members;
    see ``reward.ensemble.aggregate_rewards``).
    """

    model: str = ""  # RISD student folder or hub id
    models: tuple[str, ...] = ()  # an ensemble instead of ``model``: one folder or hub id per member
    aggregate: Literal["mean", "min", "mean_minus_std"] = "mean"  # ensembles only
    std_weight: float | None = None  # mean_minus_std only; None = 1.0
    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS  # rubric dimensions d that enter R
    weights: tuple[float, ...] | None = None  # the aggregation A: one weight per dimension; None = equal
    dtype: Dtype = "float32"
    trust_remote_code: bool = False
    max_pixels: int | None = None  # the reward's pixel budget (images are resized to it); None = processor's
    checkpoint_layers: bool = False  # recompute each VLM layer in backward (the frozen eval-mode reward)

    def __post_init__(self) -> None:
        check_dimensions(self.dimensions)
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(
                f"reward.max_pixels must be >= 1 or null (the processor's), got {self.max_pixels}"
            )
        if self.weights is not None and len(self.weights) != len(self.dimensions):
            raise ValueError(
                f"reward.weights has {len(self.weights)} values {list(self.weights)} for "
                f"{len(self.dimensions)} dimensions {list(self.dimensions)}; give one weight per dimension"
            )
        if self.weights is not None and (any(w < 0 for w in self.weights) or sum(self.weights) <= 0):
            raise ValueError(f"reward.weights must be >= 0 and not all 0, got {list(self.weights)}")
        if self.model and self.models:
            raise ValueError(
                "reward.model and reward.models are both set; give reward.model (one model) or "
                "reward.models (an ensemble), not both"
            )
        if len(set(self.models)) != len(self.models):
            raise ValueError(f"reward.models lists a model twice: {list(self.models)}")
        if not self.models and (self.aggregate != "mean" or self.std_weight is not None):
            raise ValueError(
                "reward.aggregate / reward.std_weight combine the members of reward.models; "
                "with a single reward.model leave them unset"
            )
        if self.std_weight is not None and self.aggregate != "mean_minus_std":
            raise ValueError(
                f"reward.std_weight applies to reward.aggregate=mean_minus_std only, "
                f"reward.aggregate is {self.aggregate!r}"
            )
        if self.std_weight is not None and self.std_weight < 0:
            raise ValueError(f"reward.std_weight must be >= 0, got {self.std_weight}")
        if self.aggregate == "mean_minus_std" and len(self.models) < 2:
            raise ValueError(
                f"reward.aggregate=mean_minus_std needs at least 2 reward.models, got {len(self.models)}"
            )

    @property
    def sources(self) -> tuple[str, ...]:
        """The reward model folders / hub ids: ``(model,)`` or ``models``."""
        return self.models or ((self.model,) if self.model else ())

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The frozen reward: a ``ZRewardModel`` for ``model``, a ``ZRewardEnsemble`` for ``models``."""
        kwargs = dict(
            dimensions=self.dimensions,
            weights=self.weights,
            dtype=getattr(torch, self.dtype),
            device=device,
            trust_remote_code=self.trust_remote_code,
            max_pixels=self.max_pixels,  # an ensemble's members each keep their own budget below this
            checkpoint_layers=self.checkpoint_layers,
        )
        if not self.models:
            from zr_diffusion.reward.model import ZRewardModel

            return ZRewardModel.from_pretrained(self.model, **kwargs)
        from zr_diffusion.reward.ensemble import ZRewardEnsemble

        std_weight = 1.0 if self.std_weight is None else self.std_weight
        return ZRewardEnsemble.from_pretrained(
            self.models, aggregate=self.aggregate, std_weight=std_weight, **kwargs
        )


@dataclass
class JudgeConfig:
    """A judge that scores images: a Z-Reward model, an open_clip CLIP score, or torchmetrics CLIPScore.

    ``eval-t2i`` takes one (``judge``), ``finetune-t2i`` any number by name (``validation.judges``); a
    Z-Reward judge may be a second student or a teacher, read in student mode (score right after the
    prompt).
    """

    kind: JudgeKind = "zreward"
    path: str = ""  # zreward: model folder / hub id; openclip: folder, config .json or model name; clipscore: CLIP folder / hub id
    pretrained: str | None = None  # openclip only: weights file or open_clip tag
    dimensions: tuple[str, ...] | None = None  # zreward only; None = the four rubric dimensions
    weights: tuple[float, ...] | None = None  # zreward only: aggregation weights, one per dimension
    dtype: Dtype = "float32"  # zreward only

    def __post_init__(self) -> None:
        if self.kind != "zreward" and (self.dimensions is not None or self.weights is not None):
            raise ValueError(
                f"judge.dimensions / judge.weights apply to kind 'zreward' only; judge.kind is {self.kind!r}"
            )
        if self.kind != "openclip" and self.pretrained is not None:
            raise ValueError(f"judge.pretrained applies to kind 'openclip' only; judge.kind is {self.kind!r}")
        if self.dimensions is not None:
            check_dimensions(self.dimensions)
        if self.weights is not None:
            n = len(self.dimensions or DEFAULT_DIMENSIONS)
            if len(self.weights) != n:
                raise ValueError(f"judge.weights has {len(self.weights)} values for {n} dimensions")

    def build(self, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The frozen judge; ``judge(images [B, 3, H, W] in [0, 1], prompts)`` gives ``.mu [B, D]``, ``.reward [B]``
        and ``judge.dimensions`` names the D columns."""
        if not self.path:
            raise ValueError("judge.path is empty: there is no judge to build")
        if self.kind == "zreward":
            from zr_diffusion.reward.model import ZRewardModel

            return ZRewardModel.from_pretrained(
                self.path,
                dimensions=self.dimensions,
                weights=self.weights,
                dtype=getattr(torch, self.dtype),
                device=device,
            )
        from zr_diffusion.pipelines.judges import load_judge

        kwargs = {"pretrained": self.pretrained} if self.kind == "openclip" else {}
        return load_judge(self.kind, self.path, device=device, **kwargs)


@dataclass
class ValidationConfig:
    """Held-out validation: fixed prompts x fixed noise seeds, before training, every ``every`` steps
    and at the end (``pipelines.validation``).

    Each validation scores its images with the optimised reward (per dimension) and every judge in
    ``judges`` (models the run does not optimise), each value with its standard error over the items.
    ``select_by`` (``reward`` or a judge name) keeps the LoRA of the best validation in
    ``output_dir/best``; ``patience`` stops after that many validations without improvement;
    ``keep_loras`` keeps each validated LoRA (for post-hoc diagnostics, e.g. a gold score per step).
    """

    enabled: bool = True
    every: int = 0  # validate every this many optimizer steps; 0 = only before training and at the end
    prompts: str | None = None  # prompt file; None = the first num_prompts training prompts
    num_prompts: int = 4
    seeds: tuple[int, ...] = (1234,)  # noise seeds: items = prompts x seeds, the same at every validation
    batch_size: int = 4  # images per sampling / scoring batch
    judges: dict[str, JudgeConfig] = field(default_factory=dict)  # name -> judge, never optimised
    select_by: str | None = None  # "reward" or a judge name: keep the best step's LoRA in best/
    patience: int | None = None  # stop after this many validations without improvement; None = never
    keep_loras: bool = False  # also keep every validation step's LoRA in validation/lora-step-NNNNNNN

    def __post_init__(self) -> None:
        for name in ("num_prompts", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"validation.{name} must be >= 1, got {getattr(self, name)}")
        if self.every < 0:
            raise ValueError(f"validation.every must be >= 0 (0 = only before and after), got {self.every}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"validation.seeds must be distinct and at least one, got {list(self.seeds)}")
        if self.num_prompts * len(self.seeds) < 2:
            raise ValueError(
                "validation needs at least 2 items (num_prompts x seeds) for a standard error; "
                f"got num_prompts={self.num_prompts}, seeds={list(self.seeds)}"
            )
        for name, judge in self.judges.items():
            if not name or "/" in name or name == "reward":
                raise ValueError(
                    f"validation.judges: {name!r} is not a valid judge name (non-empty, no '/', not 'reward')"
                )
            if not judge.path:
                raise ValueError(f"validation.judges.{name}.path: give the judge's folder or hub id")
        valid = ["reward", *self.judges]
        if self.select_by is not None and self.select_by not in valid:
            raise ValueError(f"validation.select_by is {self.select_by!r}; valid: {valid}")
        if self.patience is not None:
            if self.patience < 1:
                raise ValueError(f"validation.patience must be >= 1 or null, got {self.patience}")
            if self.select_by is None:
                raise ValueError(
                    f"validation.patience needs validation.select_by (what must improve); valid: {valid}"
                )
        if not self.enabled and (self.select_by is not None or self.judges):
            raise ValueError("validation.select_by / validation.judges need validation.enabled=true")


def _check_pipeline(pipeline: str) -> None:
    if not pipeline:
        raise ValueError("pipeline: give the diffusers pipeline folder or hub id")


def _check_batch(batch_size: int, run: RunConfig) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if batch_size % run.grad_accum:
        raise ValueError(
            f"batch_size={batch_size} (prompts per optimizer step) must be a multiple of "
            f"run.grad_accum={run.grad_accum} (micro-batches per step)"
        )


def micro_batch_size(batch_size: int, grad_accum: int, num_processes: int, what: str = "prompts") -> int:
    """Items per micro-batch over all processes, ``batch_size / grad_accum``; checked at start-up.

    The t2i recipes split a step's ``batch_size`` items into ``grad_accum`` micro-batches and each
    micro-batch over the processes, so ``batch_size`` must be a multiple of ``grad_accum × processes``.
    """
    micro = batch_size // grad_accum
    if batch_size % grad_accum or micro % num_processes:
        raise ValueError(
            f"a micro-batch of {batch_size / grad_accum:g} {what} (batch_size={batch_size} / run.grad_accum="
            f"{grad_accum}) does not split over {num_processes} processes; make batch_size a multiple of "
            f"{grad_accum * num_processes} or lower run.grad_accum"
        )
    return micro


@dataclass
class FinetuneT2IConfig:
    """``zr finetune-t2i``: LoRA on a diffusers denoiser, loss = −mean Z-Reward of sampled images (§6).

    ``batch_size`` prompts per optimizer step over all processes, split into ``run.grad_accum``
    micro-batches; each micro-batch is split over the processes (it must divide evenly at run time).
    Image size, guidance scale and where gradients flow live in ``sampler``.
    """

    pipeline: str = ""  # diffusers pipeline folder or hub id
    family: Family | None = None  # None = detected from model_index.json
    dtype: Dtype = "float32"  # frozen weights; the LoRA weights are always float32
    reward: RewardConfig = field(default_factory=RewardConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lora: T2ILoraConfig = field(default_factory=T2ILoraConfig)
    prompts: str = ""  # training prompts: .txt or .jsonl
    batch_size: int = 4
    negative_prompt: str | None = None  # CFG families only (not Flux.1)
    reg_weight: float = (
        0.0  # weight of ‖f_LoRA − f_base‖² at the same inputs; 0 = off (README: where to start)
    )
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    enable_xformers: bool = False  # xformers attention; needs the xformers package and CUDA
    resume: bool = False  # continue from the newest checkpoint in run.output_dir
    debug_rank_dumps: bool = False  # each rank writes its final LoRA to output_dir/rank{r}.safetensors

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline)
        if not self.reward.sources:
            raise ValueError(
                "reward.model: give the Z-Reward (RISD student) folder or hub id (or reward.models, an ensemble)"
            )
        if self.run.eval_every:
            raise ValueError(
                f"run.eval_every={self.run.eval_every}: finetune-t2i validates every validation.every "
                "steps; set validation.every instead and leave run.eval_every at 0"
            )
        if not self.prompts:
            raise ValueError("prompts: give the training prompt file (.txt or .jsonl)")
        _check_batch(self.batch_size, self.run)
        if self.reg_weight < 0:
            raise ValueError(f"reg_weight must be >= 0 (0 turns the regulariser off), got {self.reg_weight}")


@dataclass
class SFTT2IConfig:
    """``zr train-t2i-sft``: LoRA with the ordinary denoising loss on (prompt, image) records.

    Records: the repository's scored-record JSONL (``zr_diffusion.data``; one image may appear once
    per dimension) or a minimal JSONL of ``{"prompt": ..., "image": ...}``. ``min_score`` keeps the
    images whose mean annotated score (over ``score_dimensions``) is at least that value.
    """

    pipeline: str = ""
    family: Family | None = None
    dtype: Dtype = "float32"
    records: str = ""  # JSONL; image paths relative to its folder
    min_score: float | None = None  # scored records only
    score_dimensions: tuple[str, ...] | None = None  # dimensions averaged for min_score; None = all
    height: int = 512  # images are resized to height x width before VAE encoding
    width: int = 512
    batch_size: int = 4  # records per optimizer step over all processes
    flux_guidance: float | None = None  # Flux.1 guidance input in training; None: 3.5 (dev), 0 (schnell)
    lora: T2ILoraConfig = field(default_factory=T2ILoraConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    enable_xformers: bool = False
    resume: bool = False

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline)
        if not self.records:
            raise ValueError("records: give the (prompt, image) JSONL file")
        _check_batch(self.batch_size, self.run)
        if self.height < 1 or self.width < 1:
            raise ValueError(f"height and width must be >= 1, got {self.height}x{self.width}")
        if self.score_dimensions is not None:
            check_dimensions(self.score_dimensions)
            if self.min_score is None:
                raise ValueError("score_dimensions only selects what min_score averages; set min_score too")


@dataclass
class EvalT2IConfig:
    """``zr eval-t2i``: GSB of model A against model B (METHOD.md Eq. 21) with a judge.

    A and B are the same pipeline with LoRA ``lora_a`` / ``lora_b`` (null = the base); every
    (prompt, seed) item is generated from identical noise for both and judged once.
    """

    pipeline: str = ""
    family: Family | None = None
    dtype: Dtype = "float32"
    device: str | None = None  # None = cuda when present
    lora_a: str | None = None  # model A, usually the tuned LoRA folder
    lora_b: str | None = None  # model B, usually null (the base)
    label_a: str | None = None  # names in the report; default: the LoRA folder or "base"
    label_b: str | None = None
    prompts: str = ""  # held-out prompts: .txt or .jsonl
    max_prompts: int | None = None  # the first N prompts; None = all
    seeds: tuple[int, ...] = (0,)  # one item per (prompt, seed)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    tie_margin: float = 0.0  # |R_A − R_B| <= tie_margin is "Same"
    output_dir: str = "runs/eval-t2i"
    num_steps: int = 28
    guidance_scale: float | None = None  # None: the family's default (adapter.default_guidance_scale)
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    batch_size: int = 4  # images per generation / judging batch
    review_seed: int | None = None  # review page's left/right order; None: random, kept in the key
    enable_xformers: bool = False

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline)
        if not self.prompts:
            raise ValueError("prompts: give the held-out prompt file (.txt or .jsonl)")
        if not self.judge.path:
            raise ValueError(
                "judge.path: give the judge's folder or hub id (and judge.kind: zreward | openclip | clipscore)"
            )
        if self.lora_a is None and self.lora_b is None:
            raise ValueError("lora_a and lora_b are both null (base vs base); give at least one LoRA folder")
        if self.lora_a is not None and self.lora_a == self.lora_b:
            raise ValueError(f"lora_a and lora_b are the same folder {self.lora_a}; nothing to compare")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed")
        if self.tie_margin < 0:
            raise ValueError(f"tie_margin must be >= 0, got {self.tie_margin}")
        for name in ("num_steps", "batch_size", "height", "width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 or null (all), got {self.max_prompts}")
