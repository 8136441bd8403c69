"""Activation checkpointing of a frozen, eval-mode VLM (the reward model inside a reward-gradient step).

transformers' ``gradient_checkpointing_enable()`` only acts in training mode: its
``GradientCheckpointingLayer`` checks ``self.gradient_checkpointing and self.training`` (``modeling_layers.py``).
A frozen reward stays in eval mode, yet its activations are kept for the gradient to the image. Here every
``GradientCheckpointingLayer`` (the vision blocks and the language-model decoder layers) is wrapped with
torch's ``checkpoint_wrapper`` (non-reentrant ``torch.utils.checkpoint``): the graph keeps each layer's inputs
only and backward recomputes one layer at a time. Values and gradients are unchanged; state-dict keys too
(the wrapper strips its own prefix).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointWrapper,
    apply_activation_checkpointing,
)
from transformers.modeling_layers import GradientCheckpointingLayer


def checkpoint_layers(model: nn.Module) -> int:
    """Wrap every transformer layer of ``model`` in a checkpoint (in place); returns how many are wrapped.

    Works in eval mode and whenever grad is enabled; under ``torch.no_grad()`` the layers run as before.
    Calling it twice wraps nothing more.
    """
    apply_activation_checkpointing(
        model,
        check_fn=lambda m: isinstance(m, GradientCheckpointingLayer) and not isinstance(m, CheckpointWrapper),
    )
    return checkpointed_layers(model)


def checkpointed_layers(model: nn.Module) -> int:
    """How many layers of ``model`` are wrapped by :func:`checkpoint_layers`."""
    return sum(isinstance(m, CheckpointWrapper) for m in model.modules())
