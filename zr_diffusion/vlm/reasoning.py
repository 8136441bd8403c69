"""Teacher reasoning rollouts: sample ``o = (ρ, a)`` up to the score marker and read q where the
score token is written (METHOD.md §2–3).

Sampling uses a generation config built from the rollout settings alone (:func:`sampling_config`),
so the outputs come from the policy whose log-probs the losses use (π_old), whatever the
checkpoint's ``generation_config.json`` says. With a chat template that opened a ``<think>`` block
the score marker counts only after the block closes.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from zr_diffusion.scores import score_distribution
from zr_diffusion.vlm.readout import (
    THINK_CLOSE,
    ImageFeatures,
    VLMScorer,
    dimension_list,
    opens_thinking,
)


@dataclass
class ReasoningSample:
    """One teacher output ``o = (ρ, a)``: the reasoning, the marker, and q read after the marker."""

    input_index: int  # which input (image, prompt, dimension) it belongs to
    text: str  # reasoning text before the marker
    token_ids: list[int]  # the suffix fed back for readout: reasoning ids + score-marker ids
    marker_appended: bool  # True when the model did not write the marker within the budget
    score_logits: torch.Tensor  # [S] at the position after the marker
    probs: torch.Tensor  # [S]
    num_generated_tokens: int  # tokens sampled from the model (marker included when generated, EOS counted)
    marker_length: int = 0  # how many trailing token_ids are the marker

    @property
    def sampled_length(self) -> int:
        """How many leading ``token_ids`` the model sampled (an appended marker was not sampled)."""
        return len(self.token_ids) - (self.marker_length if self.marker_appended else 0)


def find_marker_end(
    ids: Sequence[int], variants: Sequence[Sequence[int]], start: int = 0
) -> tuple[int, int] | None:
    """``(start, end)`` of the first marker occurrence in ``ids`` at or after ``start`` (``end``
    exclusive), or None."""
    best = None
    for var in variants:
        k = len(var)
        for end in range(start + k, len(ids) + 1):
            if tuple(ids[end - k : end]) == tuple(var):
                if best is None or end < best[1]:
                    best = (end - k, end)
                break
    return best


def think_close_end(ids: Sequence[int], tokenizer) -> int | None:
    """The least ``i`` such that ``ids[:i]`` spells ``</think>`` (at the text level: BPEs merge its
    ``>`` with following newlines), or None when the text never closes a thinking block."""
    if THINK_CLOSE not in tokenizer.decode(ids):
        return None
    lo, hi = 1, len(ids)  # containment only grows with the prefix: bisect on it
    while lo < hi:
        mid = (lo + hi) // 2
        if THINK_CLOSE in tokenizer.decode(ids[:mid]):
            hi = mid
        else:
            lo = mid + 1
    return lo


class _MarkerStop:
    """Stopping criterion: a sequence is done once its generated tail ends with a marker variant.

    With ``tokenizer`` (the prompt opened a thinking block) a marker counts only once the generated
    text has closed the block with ``</think>``."""

    _WINDOW = 16  # tokens decoded to look for a fresh </think>

    def __init__(self, variants: Sequence[Sequence[int]], prompt_length: int, tokenizer=None):
        self.variants = [torch.tensor(v) for v in variants]
        self.prompt_length = prompt_length
        self.tokenizer = tokenizer
        self.closed: list[bool] | None = None

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_length
        for var in self.variants:
            k = len(var)
            if generated >= k:
                done |= (input_ids[:, -k:] == var.to(input_ids.device)).all(-1)
        if self.tokenizer is None:
            return done
        if self.closed is None:
            self.closed = [False] * input_ids.shape[0]
        done &= torch.tensor(self.closed, device=done.device)  # a marker inside the block does not count
        tail = input_ids[:, max(self.prompt_length, input_ids.shape[1] - self._WINDOW) :].tolist()
        for n, row in enumerate(tail):
            self.closed[n] = self.closed[n] or THINK_CLOSE in self.tokenizer.decode(row)
        return done


@torch.no_grad()
def generate_reasoning(
    scorer: VLMScorer,
    images: torch.Tensor | ImageFeatures,
    prompts: Sequence[str],
    dimensions: str | Sequence[str],
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    max_new_tokens: int = 256,
    logits_processor=None,
) -> list[list[ReasoningSample]]:
    """Sample ``num_samples`` (G) teacher outputs per input and read q after each score marker.

    Inputs are B images (or their precomputed features), one prompt and one dimension each (a single
    dimension name applies to all). Sampling stops per sequence at the score marker; an output that
    has no marker within ``max_new_tokens`` (or that ends first) gets the marker appended and
    ``marker_appended=True``. Returns ``[B][G]`` samples. ``temperature=0`` samples greedily.
    """
    from transformers import LogitsProcessorList, StoppingCriteriaList

    features = images if isinstance(images, ImageFeatures) else scorer.encode_images(images)
    n_inputs = features.grid_thw.shape[0]
    dims = dimension_list(dimensions)
    dims = dims * n_inputs if len(dims) == 1 else dims
    if not (len(prompts) == len(dims) == n_inputs):
        raise ValueError(
            f"generate_reasoning needs one prompt and dimension per image; got {len(prompts)} prompts and "
            f"{len(dims)} dimensions for {n_inputs} images"
        )
    if num_samples < 1 or max_new_tokens < 1:
        raise ValueError(
            f"num_samples and max_new_tokens must be >= 1, got {num_samples} and {max_new_tokens}"
        )
    index = [b for b in range(n_inputs) for _ in range(num_samples)]
    rollout_features = features.select(index)
    batch = scorer.inputs.batch(
        [prompts[b] for b in index], [dims[b] for b in index], features.size, "teacher", device=scorer.device
    )
    variants = scorer.marker_spellings
    # a template that opened <think>: the score is written after the block closes
    thinking = opens_thinking(scorer.inputs.chat_text(prompts[0], dims[0], "teacher"))
    prompt_length = batch.input_ids.shape[1]
    eos = _eos_ids(scorer)
    config = sampling_config(
        scorer.model.generation_config,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=eos,
        pad_token_id=scorer.inputs.pad_token_id,
        suppress_tokens=_unsampleable_ids(scorer),
    )
    sequences = scorer.model.generate(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        mm_token_type_ids=(batch.input_ids == scorer.image_token_id).long(),
        image_grid_thw=rollout_features.grid_thw,
        mm_encoder_outputs={"image": rollout_features.output},
        generation_config=config,
        stopping_criteria=StoppingCriteriaList(
            [_MarkerStop(variants, prompt_length, scorer.tokenizer if thinking else None)]
        ),
        logits_processor=logits_processor if logits_processor is not None else LogitsProcessorList(),
        synced_gpus=is_sharded(scorer.model),  # FSDP: every rank runs a forward until all are done
    )
    # an appended marker closes a still-open block first, as the templates' own empty block does
    closing = scorer.tokenizer.encode(f"\n{THINK_CLOSE}\n\n", add_special_tokens=False) if thinking else None
    suffixes, meta = [], []
    for row in sequences[:, prompt_length:].tolist():
        suffixes.append(
            _split_generation(row, variants, eos, scorer.marker_ids, meta, closing, scorer.tokenizer)
        )
    readout = scorer.suffix_readout(
        rollout_features, [prompts[b] for b in index], [dims[b] for b in index], suffixes, mode="teacher"
    )
    probs = score_distribution(readout.score_logits)  # [B * G, S]
    out: list[list[ReasoningSample]] = [[] for _ in range(n_inputs)]
    for k, b in enumerate(index):
        reasoning_ids, appended, n_generated = meta[k]
        out[b].append(
            ReasoningSample(
                input_index=b,
                text=scorer.tokenizer.decode(reasoning_ids, skip_special_tokens=True),
                token_ids=suffixes[k],
                marker_appended=appended,
                score_logits=readout.score_logits[k],
                probs=probs[k],
                num_generated_tokens=n_generated,
                marker_length=len(suffixes[k]) - len(reasoning_ids),
            )
        )
    return out


def is_sharded(model) -> bool:
    """Whether ``model`` holds FSDP2 units, so that each forward is a collective of all ranks."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


# generation_config fields that shape the distribution generate() samples from, at their neutral value
_NEUTRAL_SAMPLING = dict(
    min_new_tokens=0,  # takes precedence over min_length (setting both makes generate() warn each call)
    num_beams=1,
    num_beam_groups=1,
    diversity_penalty=0.0,
    typical_p=1.0,
    epsilon_cutoff=0.0,
    eta_cutoff=0.0,
    repetition_penalty=1.0,
    encoder_repetition_penalty=1.0,
    no_repeat_ngram_size=0,
    encoder_no_repeat_ngram_size=0,
    renormalize_logits=False,
    remove_invalid_values=False,
    guidance_scale=1.0,
    token_healing=False,
)
# ... and those that have no neutral value to set: a checkpoint that sets one is refused
_NO_NEUTRAL_SAMPLING = (
    "min_p",
    "top_h",
    "bad_words_ids",
    "sequence_bias",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "begin_suppress_tokens",
    "exponential_decay_length_penalty",
    "watermarking_config",
    "constraints",
    "force_words_ids",
    "stop_strings",
    "penalty_alpha",
    "dola_layers",
)


def sampling_config(
    checkpoint_config,
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    max_new_tokens: int,
    eos_token_id: list[int],
    pad_token_id: int,
    suppress_tokens: list[int],
):
    """The ``GenerationConfig`` of a rollout, built here so that it samples exactly from π_old.

    ``generate()`` fills every field a given config leaves unset from the checkpoint's
    ``generation_config.json`` (``checkpoint_config``); released checkpoints set e.g.
    ``repetition_penalty: 1.05``, while π_old, π_ref and OPD log-probs are the model's plain softmax.
    So every field that shapes the sampled distribution is set explicitly (temperature, top-p and
    top-k from the rollout config, the rest at their neutral values), and a checkpoint that sets a
    field without a neutral value (``bad_words_ids``, ``sequence_bias``, ...) is refused, naming it.
    ``temperature=0`` decodes greedily.
    """
    from transformers import GenerationConfig

    for name in _NO_NEUTRAL_SAMPLING:
        value = getattr(checkpoint_config, name, None)
        if value is not None:
            raise ValueError(
                f"the checkpoint's generation_config.json sets {name}={value!r}, which changes the distribution "
                f"rollouts are sampled from (π_old's log-probs are computed without it); remove {name} from "
                f"generation_config.json"
            )
    config = GenerationConfig(
        **_NEUTRAL_SAMPLING,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=top_p,
        top_k=top_k,
        max_new_tokens=max_new_tokens,
        eos_token_id=list(eos_token_id),
        pad_token_id=pad_token_id,
        suppress_tokens=list(suppress_tokens),
    )
    inherited = copy.deepcopy(config)  # what generate() will run with (it fills unset fields this way)
    inherited.update(**checkpoint_config.to_dict(), defaults_only=True)
    names = (*_NEUTRAL_SAMPLING, *_NO_NEUTRAL_SAMPLING, "do_sample", "temperature", "top_p", "top_k")
    changed = [n for n in names if getattr(inherited, n, None) != getattr(config, n, None)]
    if changed:
        raise ValueError(
            f"the checkpoint's generation_config.json would change rollout sampling through {changed}; "
            f"remove these fields from generation_config.json"
        )
    return config


def _unsampleable_ids(scorer: VLMScorer) -> list[int]:
    """Vision placeholders (they would be read as image positions) and ids past the tokenizer."""
    config = scorer.model.config
    ids = [
        config.image_token_id,
        config.video_token_id,
        config.vision_start_token_id,
        config.vision_end_token_id,
    ]
    vocab = scorer.model.get_output_embeddings().weight.shape[0]
    return sorted({int(i) for i in ids} | set(range(len(scorer.tokenizer), vocab)))


def _eos_ids(scorer: VLMScorer) -> list[int]:
    eos = scorer.model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    im_end = scorer.tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end not in eos and im_end != scorer.tokenizer.unk_token_id:
        eos.append(im_end)
    return eos


def _split_generation(
    row: list[int],
    variants,
    eos: Sequence[int],
    marker_ids: Sequence[int],
    meta: list,
    closing: Sequence[int] | None = None,
    tokenizer=None,
) -> list[int]:
    """Cut one generated row at the marker (or at its end) and record (reasoning, appended, count).

    With ``closing`` (the prompt opened a thinking block; ``tokenizer`` decodes the row) only a marker
    after the block's ``</think>`` counts, and a row whose block is still open gets ``closing`` before
    the appended marker.
    """
    end = next((i for i, tok in enumerate(row) if tok in eos), None)
    n_generated = len(row) if end is None else end + 1
    body = row if end is None else row[:end]
    start = 0
    if closing is not None:
        closed = think_close_end(body, tokenizer)
        if closed is None:
            meta.append((body, True, n_generated))
            return body + list(closing) + list(marker_ids)
        start = closed
    found = find_marker_end(body, variants, start)
    if found is not None:
        start, stop = found
        meta.append((body[:start], False, stop))
        return body[:stop]
    meta.append((body, True, n_generated))
    return body + list(marker_ids)
