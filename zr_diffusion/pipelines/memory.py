"""Measuring what a differentiable sampler keeps for backward, on any device.

``SavedTensorMeter`` counts the bytes of the distinct tensors autograd saves for backward while it is
active (the activations a graph holds until ``backward``), leaving out the given parameters. A
non-reentrant ``torch.utils.checkpoint`` call shows up as the inputs it keeps for recomputation (they
are saved through these hooks); what it saves inside its region goes to the region's own hooks and is
recomputed in backward, a transient this meter does not see.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class SavedTensorMeter:
    """Context manager: ``with SavedTensorMeter(params) as m: loss = f(x)`` then read ``m.bytes``."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: dict[tuple[torch.device, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude:
            self._seen[(tensor.device, ptr)] = storage.nbytes()
        return tensor

    @staticmethod
    def _unpack(tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
