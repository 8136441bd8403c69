"""Score bins, score tokens, and decoding q / μ from logits (METHOD.md §1).

The score distribution of a sample is read Q-Align style: at the score position, the logits of the
S score tokens (one vocabulary token per bin) are soft-maxed into ``q(s)``; the reward is the
expectation ``μ = Σ_s s · q(s)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_SCORE_TOKENS: tuple[str, ...] = ("1", "2", "3", "4", "5", "6", "7", "8", "9")


class ScoreTokenError(ValueError):
    """A score token is not exactly one token of the tokenizer."""


class OffGridScoreError(ValueError):
    """An annotated score does not lie on the score grid."""


@dataclass(frozen=True)
class ScoreGrid:
    """The score bins ``s_min, s_min + step, ..., s_max`` and the token that stands for each bin.

    The default is the paper's nine half-point bins 1.0 … 5.0 read from the digits "1" … "9".
    """

    s_min: float = 1.0
    s_max: float = 5.0
    step: float = 0.5
    tokens: tuple[str, ...] = DEFAULT_SCORE_TOKENS

    def __post_init__(self) -> None:
        if not (self.step > 0 and self.s_max > self.s_min):
            raise ValueError(
                f"score grid needs step > 0 and s_max > s_min, got s_min={self.s_min}, "
                f"s_max={self.s_max}, step={self.step}"
            )
        n = (self.s_max - self.s_min) / self.step
        if abs(n - round(n)) > 1e-6:
            raise ValueError(
                f"score grid: (s_max - s_min) / step must be a whole number, got "
                f"({self.s_max} - {self.s_min}) / {self.step} = {n}"
            )
        object.__setattr__(self, "tokens", tuple(self.tokens))
        if len(self.tokens) != self.num_bins:
            raise ValueError(
                f"score grid has {self.num_bins} bins {self.bins} but {len(self.tokens)} score tokens "
                f"{self.tokens}: give exactly one token per bin"
            )
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError(f"score tokens must be distinct, got {self.tokens}")

    @property
    def num_bins(self) -> int:
        return int(round((self.s_max - self.s_min) / self.step)) + 1

    @property
    def bins(self) -> tuple[float, ...]:
        return tuple(self.s_min + i * self.step for i in range(self.num_bins))

    @property
    def range(self) -> float:
        """``S_max − S_min``, the normaliser of Eq. 7, 10 and 11."""
        return self.s_max - self.s_min

    def values(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The bin values as a tensor ``[S]``."""
        return torch.tensor(self.bins, device=device, dtype=dtype)

    def bin_index(self, score: float, *, where: str = "") -> int:
        """Index of the bin equal to ``score``; an off-grid or out-of-range score is an error."""
        if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
            raise OffGridScoreError(f"{where}score {score!r} is not a finite number")
        pos = (score - self.s_min) / self.step
        idx = int(round(pos))
        if abs(pos - idx) > 1e-6 or not 0 <= idx < self.num_bins:
            raise OffGridScoreError(f"{where}score {score!r} is not on the score grid {list(self.bins)}")
        return idx

    def check(self, score: float, *, where: str = "") -> float:
        """Return the grid value of ``score`` (validating it); see :meth:`bin_index`."""
        return self.bins[self.bin_index(score, where=where)]

    def nearest_bin(self, value: float) -> float:
        """The bin closest to an arbitrary real value (used by simulated annotators, never on data)."""
        idx = min(max(int(round((value - self.s_min) / self.step)), 0), self.num_bins - 1)
        return self.bins[idx]

    def token_ids(self, tokenizer) -> list[int]:
        """The vocabulary id of each score token; see :func:`score_token_ids`."""
        return score_token_ids(tokenizer, self.tokens)


def score_token_ids(tokenizer, tokens: Sequence[str]) -> list[int]:
    """Map each score token to its single vocabulary id.

    A token that the tokenizer splits into several pieces (or maps to the unknown token) is a
    configuration error: the distribution is read from exactly one logit per bin.
    """
    ids: list[int] = []
    unk = getattr(tokenizer, "unk_token_id", None)
    for tok in tokens:
        pieces = tokenizer.encode(tok, add_special_tokens=False)
        if len(pieces) != 1 or (unk is not None and pieces[0] == unk):
            shown = [tokenizer.convert_ids_to_tokens(p) for p in pieces]
            raise ScoreTokenError(
                f"score token {tok!r} is not a single token of this tokenizer "
                f"(it encodes to {len(pieces)} pieces {shown}); choose score tokens that each encode "
                f"to exactly one token, e.g. the digits '1'..'9'"
            )
        ids.append(pieces[0])
    if len(set(ids)) != len(ids):
        raise ScoreTokenError(f"score tokens {list(tokens)} map to repeated ids {ids}")
    return ids


def gather_score_logits(logits: torch.Tensor, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Select the score-token logits: ``[..., V] -> [..., S]``."""
    index = torch.as_tensor(token_ids, device=logits.device, dtype=torch.long)
    return logits.index_select(-1, index)


def score_distribution(score_logits: torch.Tensor) -> torch.Tensor:
    """``q(s) = softmax(logits[score_token_ids])`` (METHOD.md §1): ``[..., S] -> [..., S]``."""
    return torch.softmax(
        score_logits.float() if score_logits.dtype in (torch.float16, torch.bfloat16) else score_logits,
        dim=-1,
    )


def expected_score(probs: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """``μ = Σ_s s · q(s)`` (METHOD.md §1, Eq. 16): ``probs [..., S], bins [S] -> [...]``."""
    return (probs * bins.to(device=probs.device, dtype=probs.dtype)).sum(-1)


def aggregate_annotators(scores: Sequence[float]) -> float:
    """Ground truth of a multi-annotator sample: drop the single highest and lowest score when there
    are at least three annotators, then take the mean (METHOD.md §1)."""
    values = [float(s) for s in scores]
    if not values:
        raise ValueError("cannot aggregate an empty list of annotator scores")
    if len(values) >= 3:
        values = sorted(values)[1:-1]
    return sum(values) / len(values)
