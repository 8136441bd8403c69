"""Configs of the reward-model recipes: ``zr train-reward`` (all six methods) and ``zr eval-reward``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from zr_diffusion.rubric import DEFAULT_DIMENSIONS, check_dimensions
from zr_diffusion.scores import DEFAULT_SCORE_TOKENS, ScoreGrid
from zr_diffusion.training import LoraConfig, OptimConfig, RunConfig

METHODS = ("gdso", "grpo", "sft", "rewarddance", "risd", "opd")
Method = Literal["gdso", "grpo", "sft", "rewarddance", "risd", "opd"]
Dtype = Literal["float32", "bfloat16", "float16"]


@dataclass
class GridConfig:
    """The score bins and their tokens (METHOD.md §1)."""

    s_min: float = 1.0
    s_max: float = 5.0
    step: float = 0.5
    tokens: tuple[str, ...] = DEFAULT_SCORE_TOKENS

    def build(self) -> ScoreGrid:
        return ScoreGrid(self.s_min, self.s_max, self.step, self.tokens)


@dataclass
class RewardDataConfig:
    """Training and evaluation records (JSONL or Parquet, see zr_diffusion.data)."""

    train: str = ""
    eval: str | None = None
    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS
    skip_bad: bool = False  # report and skip bad records instead of stopping
    max_eval_records: int | None = None

    def __post_init__(self) -> None:
        check_dimensions(self.dimensions)


@dataclass
class RolloutConfig:
    """Teacher-style sampling: reasoning, then the score marker, then the score token."""

    max_new_tokens: int = 768
    temperature: float = 1.0  # τ of the reasoning tokens and of the score token
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    # Sampling uses these values and nothing from the checkpoint's generation_config.json (a
    # repetition_penalty there would make the rollouts differ from π_old); see vlm.reasoning.sampling_config.

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"rollout.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"rollout.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"rollout.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"rollout.top_k must be >= 0 (0: no top-k filter), got {self.top_k}")


@dataclass
class GDSOConfig:
    """GDSO / GRPO settings (METHOD.md §2, Algorithm 1). GRPO uses the same rollouts without direct losses."""

    group_size: int = 8  # G outputs per side
    iterations: int = 1  # N: the reference policy is reset at the start of each
    updates_per_batch: int = 1  # K_gdso updates per rollout batch (PPO-style clipping when > 1)
    lambda_pt: float = 1.0  # Eq. 13 weight of the pointwise reward
    lambda_pw: float = 1.0  # Eq. 13 weight of the pairwise reward
    alpha_pt: float = 1.0  # Eq. 14 weight of the pointwise CE loss (GDSO only)
    alpha_pw: float = 1.0  # Eq. 14 weight of the pairwise gap loss (GDSO only)
    beta: float = 0.0  # KL(π_θ ‖ π_ref) weight
    eps: float = 1e-6  # advantage normaliser
    clip_eps: float = 0.2  # PPO ratio clip
    reward_from: Literal["expectation", "parsed_text"] = "expectation"  # the paper's ablation (Fig. 4)
    # M rollout batches per iteration. Algorithm 1 makes N x M x K optimizer steps, and run.max_steps
    # must equal that product; null derives M = run.max_steps / (N x K), which must be a whole number.
    steps_per_iteration: int | None = None
    # (H, W): resize every training image to this size; null: all training images must share one size
    # (a batch is one tensor; checked at start-up from the file headers)
    image_size: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if self.group_size < 1:
            raise ValueError(f"gdso.group_size (G) must be >= 1, got {self.group_size}")
        if self.iterations < 1 or self.updates_per_batch < 1:
            raise ValueError("gdso.iterations and gdso.updates_per_batch must be >= 1")
        if self.steps_per_iteration is not None and self.steps_per_iteration < 1:
            raise ValueError(
                f"gdso.steps_per_iteration (M) must be >= 1 or null, got {self.steps_per_iteration}"
            )
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"gdso.image_size must be [H, W] with H, W >= 1 or null, got {self.image_size}")
        if not 0 < self.clip_eps < 1:
            raise ValueError(f"gdso.clip_eps must be in (0, 1), got {self.clip_eps}")
        if not self.eps > 0:
            raise ValueError(f"gdso.eps must be > 0, got {self.eps}")
        for name in ("lambda_pt", "lambda_pw", "alpha_pt", "alpha_pw", "beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"gdso.{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class PolicyLossConfig:
    """How L_GRPO (Eq. 4) aggregates the token terms of GDSO / GRPO outputs (METHOD.md §2).

    ``sum``: Σ over each output's tokens, mean over outputs (the paper's Eq. 4); ``sequence_mean``:
    1/|o| per output (DeepSeekMath's GRPO); ``token_mean``: one mean over all tokens of the batch
    (DAPO). The choice scales L_GRPO against α·L_CE and α·L_pw by about the output length.
    """

    aggregate: Literal["sum", "sequence_mean", "token_mean"] = "sum"

    def __post_init__(self) -> None:
        from zr_diffusion.reward.losses import AGGREGATES

        if self.aggregate not in AGGREGATES:
            raise ValueError(
                f"policy_loss.aggregate must be one of {list(AGGREGATES)}, got {self.aggregate!r}"
            )


@dataclass
class DistillConfig:
    """RISD and OPD settings (METHOD.md §3, §4)."""

    teacher: str = ""  # trained teacher folder or hub id
    teacher_rollouts: int = 1  # R teacher rollouts averaged per record (RISD; paper: 1)
    cache_dir: str | None = None  # teacher-target cache; default <output_dir>/teacher_cache
    teacher_batch_size: int = 8  # records per teacher rollout batch while building the cache (RISD)

    def __post_init__(self) -> None:
        if self.teacher_rollouts < 1:
            raise ValueError(f"distill.teacher_rollouts must be >= 1, got {self.teacher_rollouts}")
        if self.teacher_batch_size < 1:
            raise ValueError(f"distill.teacher_batch_size must be >= 1, got {self.teacher_batch_size}")


@dataclass
class TrainRewardConfig:
    """``zr train-reward``: one config for every method; the method picks which sections matter."""

    method: Method = "sft"
    model: str = ""  # base model: folder or hub id (teacher for gdso/grpo/rewarddance; student for risd/opd)
    trust_remote_code: bool = False
    dtype: Dtype = "float32"  # weights of frozen parts; trainable weights stay float32
    gradient_checkpointing: bool = False
    train_vision_tower: bool = False  # also LoRA / fine-tune the vision tower (frozen by default)
    # passed to apply_chat_template for the teacher template (Qwen3-family templates may then open a
    # <think> block for the reasoning); the student template always gets false
    enable_thinking: bool = False
    batch_size: int = 4  # global: preference pairs for gdso/grpo, records otherwise
    eval_batch_size: int = 8
    grid: GridConfig = field(default_factory=GridConfig)
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    gdso: GDSOConfig = field(default_factory=GDSOConfig)
    policy_loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    resume: bool = False

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: give the base model folder or hub id")
        if not self.data.train:
            raise ValueError("data.train: give the training records file (.jsonl or .parquet)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.method in ("risd", "opd") and not self.distill.teacher:
            raise ValueError(
                f"method {self.method} needs distill.teacher (the trained teacher folder or hub id)"
            )


@dataclass
class EvalRewardConfig:
    """``zr eval-reward``: HPA, margin HPA, PLCC, SRCC, tokens per call, images per second."""

    model: str = ""
    data: str = ""  # test records; multi-annotator records use the drop-high/low mean as ground truth
    mode: Literal["student", "teacher"] = "student"
    dimensions: tuple[str, ...] = DEFAULT_DIMENSIONS
    output_dir: str = "runs/eval-reward"
    batch_size: int = 8
    max_records: int | None = None
    trust_remote_code: bool = False
    dtype: Dtype = "float32"
    device: str | None = None
    seed: int = 0
    grid: GridConfig = field(default_factory=GridConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    skip_bad: bool = False
    enable_thinking: bool = False  # teacher mode: passed to apply_chat_template (student: always false)
    teacher_samples: int = 1  # teacher mode: reasoning samples per (image, dimension); μ is their mean

    def __post_init__(self) -> None:
        if not self.model:
            raise ValueError("model: give the reward model folder or hub id")
        if self.batch_size < 1:
            raise ValueError(f"batch_size (images per scoring batch) must be >= 1, got {self.batch_size}")
        if self.teacher_samples < 1:
            raise ValueError(f"teacher_samples must be >= 1, got {self.teacher_samples}")
        if self.max_records is not None and self.max_records < 1:
            raise ValueError(f"max_records must be >= 1 or null (all records), got {self.max_records}")
        if not self.data:
            raise ValueError("data: give the test records file (.jsonl or .parquet)")
        check_dimensions(self.dimensions)
