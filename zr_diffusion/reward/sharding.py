"""FSDP2 (``fully_shard``) for the reward policy: every sub-module the scorer calls on its own is its
own shard unit.

The scorer does not only call the model's forward: it runs the vision tower alone once for all
dimensions (``model.model.get_image_features``), applies the LM head to chunks of hidden states
(:func:`zr_diffusion.vlm.logprobs.selected_logits`), and ``generate`` calls the VLM below a PEFT
wrapper. FSDP2 gathers a unit's parameters in that unit's forward pre-hook, so each of these entry
points is a unit: the decoder layers and vision blocks (accelerate's wrapping unit), the vision tower,
the input embedding and the LM head (one unit, as they may be tied), the final norm and the root.
The root then owns no parameter that a call outside its forward could need.

Under FSDP every forward is a collective: all ranks must make the same calls. ``generate`` runs with
``synced_gpus`` (``vlm.reasoning.is_sharded``), evaluation runs on every rank, and a batch's records must
share one image size on every rank (one forward per image size).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def uses_fsdp(accelerator) -> bool:
    """Whether the run is sharded: accelerate chose FSDP (GPUs), or ``accelerate launch`` ran an FSDP
    config on CPU processes. accelerate 1.16 enables FSDP only for GPU-like devices and leaves CPU
    processes at MULTI_CPU (where ``prepare`` would wrap the model in DDP); the launcher's
    ``ACCELERATE_USE_FSDP`` says what the config asked for, and the recipes shard the policy themselves
    in both cases (:func:`shard_policy`), with gloo on CPUs."""
    if str(accelerator.distributed_type).endswith("FSDP"):
        return True
    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    return asked and accelerator.num_processes > 1


def fsdp_plugin(accelerator, mixed_precision: str):
    """accelerate's FSDP settings: the accelerator's own plugin, or one read from the launcher's
    ``FSDP_*`` environment (CPU processes, where accelerate builds none)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None:
        plugin = FullyShardedDataParallelPlugin()
        if mixed_precision != "no":
            plugin.set_mixed_precision(mixed_precision)
    if plugin.fsdp_version != 2:
        raise ValueError(
            f"the reward recipes support FSDP2 only (fully_shard), got fsdp_version {plugin.fsdp_version}; "
            f"set fsdp_config.fsdp_version: 2 in the accelerate config"
        )
    return plugin


def _units(vlm: torch.nn.Module) -> list[torch.nn.Module | list[torch.nn.Module]]:
    """Shard units of a Qwen-VL model, innermost first (``fully_shard`` goes bottom-up).

    The language model itself is not a unit but its final norm is: ``fully_shard`` renames a unit's
    class, and transformers finds which outputs a model can record (the last hidden state that
    :meth:`VLMScorer.forward_hidden` reads) by the class name of the language model."""
    inner = vlm.model
    blocks = list(getattr(inner.visual, "blocks", []))
    text = inner.language_model
    head = [text.embed_tokens, vlm.lm_head]
    return [*blocks, inner.visual, *text.layers, head, text.norm]


def shard_policy(policy, plugin) -> None:
    """Apply ``fully_shard`` to ``policy.model`` in place (units: :func:`_units`, then the root) with
    ``plugin``'s mixed precision and resharding, and initialise the root so that a unit called outside
    the root's forward (the vision tower) is not taken for a root. ``policy.params`` becomes the
    sharded parameters (build the optimizer after this)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {
        "reshard_after_forward": bool(plugin.reshard_after_forward),
        "mp_policy": plugin.mixed_precision_policy or MixedPrecisionPolicy(),
    }
    for unit in _units(policy.vlm):
        fully_shard(unit, **kwargs)
    fully_shard(policy.model, **kwargs)
    policy.model._get_fsdp_state()._lazy_init()  # private: torch has no public call for it
    policy.params = [p for p in policy.model.parameters() if p.requires_grad]


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Within the block every FSDP2 unit of ``model`` holds its full parameters (a collective: call on
    every rank); the shards are restored on exit. No-op for an unsharded model."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (a collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def placed_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor placed as ``param`` is: this rank's shard of a DTensor parameter (no collective:
    every rank holds the whole tensor), else the tensor on the parameter's device and dtype."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    tensor = tensor.to(device=param.device, dtype=param.dtype)
    if isinstance(param, DTensor):
        return distribute_tensor(tensor, param.device_mesh, param.placements, src_data_rank=None)
    return tensor


class ShardedTrainState:
    """The checkpointed state of a sharded policy: its trainable weights and the optimizer's state,
    whole. accelerate's ``save_state`` calls :meth:`state_dict` on every rank (the gathers are
    collectives) and writes the main process's; ``load_state`` gives every rank the whole state and
    each takes its shards. Register with ``accelerator.register_for_checkpointing``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def _trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return {
            "weights": {n: full_tensor(p.detach()).cpu() for n, p in self._trainable().items()},
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer, options=options),
        }

    def load_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        params = self._trainable()
        if set(state["weights"]) != set(params):
            missing, extra = (
                sorted(set(params) - set(state["weights"])),
                sorted(set(state["weights"]) - set(params)),
            )
            raise ValueError(
                f"checkpoint does not match this run's trainable parameters: missing {missing[:5]}, "
                f"unexpected {extra[:5]}; resume with the same lora/model settings"
            )
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(placed_like(state["weights"][n], p))
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=state["optimizer"], options=options
        )
