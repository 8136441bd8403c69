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
    """The frozen Z-Reward model whose aggregate ``R = Σ_d w_d μ_d`` is maximised (METHOD.md §6)."""

    model: str = ""  # RISD student folder or hub id
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


@dataclass
class JudgeConfig:
    """A judge that scores images: a Z-Reward model, an open_clip CLIP score, or torchmetrics CLIPScore.

    An empty ``path`` means no judge where a judge is optional (validation).
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
    """Validation: images from fixed seeds every ``run.eval_every`` steps and at the end.

    Writes ``output_dir/validation/step-NNNNNNN.png`` (a grid) and logs the mean reward per dimension
    and, with ``judge``, the reward of a second judge that the training does not optimise.
    """

    enabled: bool = True
    prompts: str | None = None  # prompt file; None = the first num_prompts training prompts
    num_prompts: int = 4
    seed: int = 1234  # the same noise at every validation
    judge: JudgeConfig = field(default_factory=JudgeConfig)  # non-optimised judge; path "" = none

    def __post_init__(self) -> None:
        if self.num_prompts < 1:
            raise ValueError(f"validation.num_prompts must be >= 1, got {self.num_prompts}")


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
    reg_weight: float = 0.0  # weight of ‖ε_LoRA − ε_base‖² at the same inputs; 0 = off
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    enable_xformers: bool = False  # xformers attention; needs the xformers package and CUDA
    resume: bool = False  # continue from the newest checkpoint in run.output_dir
    debug_rank_dumps: bool = False  # each rank writes its final LoRA to output_dir/rank{r}.safetensors

    def __post_init__(self) -> None:
        _check_pipeline(self.pipeline)
        if not self.reward.model:
            raise ValueError("reward.model: give the Z-Reward (RISD student) folder or hub id")
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
    flux_guidance: float = 3.5  # Flux.1-dev guidance-embedding value during training (Flux only)
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
    guidance_scale: float = 5.0
    height: int = 512
    width: int = 512
    negative_prompt: str | None = None
    batch_size: int = 4  # images per generation / judging batch
    review_seed: int = 0  # left/right order on the review page
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
