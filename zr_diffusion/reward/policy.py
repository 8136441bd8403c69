"""The trainable reward policy: LoRA or full fine-tuning of a Qwen-VL, the accelerate wrapper that
keeps the scorer's calls synced across processes, frozen teachers, and the final model folder.

Multi-process (``accelerate launch``): the policy is prepared by accelerate (DDP wraps it), and the
scorer's ``__call__`` path goes through that wrapper (:class:`PreparedVLM`), so gradients are
all-reduced; vision-tower passes and ``generate`` use the unwrapped model directly (no trainable
parameter of a frozen vision tower needs syncing). Under FSDP2 the model is sharded in place
instead (:mod:`zr_diffusion.reward.sharding`) and every call, wrapped or not, gathers the units it uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zr_diffusion.io import write_dir_atomically
from zr_diffusion.vlm.loading import load_vlm
from zr_diffusion.vlm.readout import VLMScorer

if TYPE_CHECKING:
    from zr_diffusion.reward.config import TrainRewardConfig


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
    scorer = VLMScorer(vlm, processor, grid, enable_thinking=cfg.enable_thinking)
    plain_scorer = VLMScorer(vlm, processor, grid, scorer.spec, enable_thinking=cfg.enable_thinking)
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
    return VLMScorer(vlm, processor, cfg.grid.build(), enable_thinking=cfg.enable_thinking)


# --------------------------------------------------------------------------------------------------
# the final model folder


def held_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The entries of ``module.state_dict()`` (parameters and persistent buffers), as the tensors its
    sub-modules hold now: under FSDP2, inside :func:`zr_diffusion.reward.sharding.gathered`, the whole
    parameters (``state_dict()`` itself would reshard them and return the shards)."""
    out = dict(module.named_parameters(remove_duplicate=False))
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, buf in sub._buffers.items():
            if buf is not None and name not in sub._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf
    return out


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
    for key, value in held_state_dict(policy.vlm).items():
        prefix = next((p for p in lora_prefixes if key.startswith(p)), None)
        if prefix is None:
            out[key] = value.detach().cpu()
    return out


def save_reward_model(policy: Policy, out_dir: str | Path) -> Path:
    """Write the trained reward model to ``out_dir``, atomically (the folder appears whole or not).

    The folder loads with ``ZRewardModel.from_pretrained`` and ``load_vlm``: safetensors weights
    with LoRA merged in (the policy itself is left unmerged) plus the processor. Under LoRA the
    adapter alone is also saved in ``out_dir/adapter`` (peft format, ``PeftModel.from_pretrained``).
    Call on the main process only; under FSDP2 inside ``sharding.gathered`` (every rank).
    """

    def write(tmp: Path) -> None:
        if policy.lora:
            state = _merged_state_dict(policy)
            policy.vlm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
            adapter = {k: v.detach().cpu() for k, v in held_state_dict(policy.model).items()}
            policy.model.save_pretrained(tmp / "adapter", state_dict=adapter, safe_serialization=True)
        else:
            state = {k: v.detach().cpu() for k, v in held_state_dict(policy.vlm).items()}
            policy.vlm.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        policy.processor.save_pretrained(tmp)

    return write_dir_atomically(out_dir, write)
