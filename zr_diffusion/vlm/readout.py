"""Chat-formatted scoring inputs and the score readout ``q(s | p, I, d, ρ)`` (METHOD.md §1–3).

One vision-encoder pass per image serves every rubric dimension and every reasoning sample of that
image: :meth:`VLMScorer.image_features` runs the vision tower once, and each text sequence receives
its image's features at its image-pad positions (the model's own scatter, M-RoPE position ids from
the model's own ``get_rope_index``; Qwen3-VL DeepStack features travel with them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property
from typing import Literal, NamedTuple

import torch
from PIL import Image

from zr_diffusion.rubric import SCORE_MARKER, check_dimensions, student_instruction, teacher_instruction
from zr_diffusion.scores import ScoreGrid, gather_score_logits
from zr_diffusion.vlm.loading import SUPPORTED_FAMILIES, UnsupportedModelError
from zr_diffusion.vlm.logprobs import DEFAULT_CHUNK, selected_logits
from zr_diffusion.vlm.preprocess import VisionSpec, preprocess_images

Mode = Literal["student", "teacher"]
MODES: tuple[str, ...] = ("student", "teacher")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown scoring mode {mode!r}; valid modes: {list(MODES)}")


class ChatBatch(NamedTuple):
    """Left-padded token ids of N scoring sequences (prompt, then an optional suffix)."""

    input_ids: torch.Tensor  # [N, L]
    attention_mask: torch.Tensor  # [N, L]
    suffix_lengths: torch.Tensor  # [N], tokens after the generation prompt


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def opens_thinking(chat_text: str) -> bool:
    """Whether a chat-formatted text ends inside an open ``<think>`` block (Qwen3-family templates)."""
    return chat_text.rfind(THINK_OPEN) > chat_text.rfind(THINK_CLOSE)


class ScoringInputs:
    """Builds chat-formatted scoring inputs with the real processor, cached per
    ``(prompt, dimension, image size, mode)``.

    The message is ``[{role: user, content: [image, instruction]}]`` with the generation prompt
    appended; the processor expands the image placeholder to one pad token per merged vision token.
    ``enable_thinking`` goes to ``apply_chat_template`` for the teacher template (its reasoning may
    happen inside a ``<think>`` block the template opens); the student template always gets
    ``enable_thinking=False``, and a template that still leaves a thinking block open at the
    student's answer position is refused: the student's score is read outside any reasoning.
    """

    def __init__(
        self,
        processor,
        grid: ScoreGrid,
        spec: VisionSpec | None = None,
        max_cache: int = 65536,
        enable_thinking: bool = False,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.grid = grid
        self.spec = spec if spec is not None else VisionSpec.from_processor(processor)
        self.max_cache = max_cache
        self.enable_thinking = bool(enable_thinking)
        self._cache: OrderedDict[tuple, tuple[int, ...]] = OrderedDict()
        pad = self.tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else self.tokenizer.eos_token_id
        if self.pad_token_id is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token to pad batches with")

    def instruction(self, prompt: str, dimension: str, mode: Mode) -> str:
        _check_mode(mode)
        make = student_instruction if mode == "student" else teacher_instruction
        return make(prompt, dimension, self.grid)

    def chat_text(self, prompt: str, dimension: str, mode: Mode) -> str:
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image"},
                    {"type": "text", "text": self.instruction(prompt, dimension, mode)},
                ],
            }
        ]
        thinking = self.enable_thinking and mode == "teacher"
        # a template that never reads the flag gets none (transformers warns about unread kwargs)
        template = self.processor.chat_template or ""
        flags = {"enable_thinking": thinking} if "enable_thinking" in template else {}
        text = self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **flags
        )
        if mode == "student" and opens_thinking(text):
            raise ValueError(
                f"the chat template leaves a {THINK_OPEN} block open at the student's answer position even "
                f"with enable_thinking=False (generation prompt ends {text[-40:]!r}); the student's score "
                f"is read right after the prompt, outside any reasoning: use a chat template that closes "
                f"the block (or emits none) when enable_thinking is false"
            )
        return text

    def prompt_ids(self, prompt: str, dimension: str, size: tuple[int, int], mode: Mode) -> tuple[int, ...]:
        """Token ids of one scoring prompt for an on-grid image of ``size = (H, W)`` pixels."""
        key = (prompt, dimension, tuple(size), mode)
        if (ids := self._cache.get(key)) is not None:
            self._cache.move_to_end(key)
            return ids
        height, width = size
        blank = Image.new("RGB", (width, height))
        enc = self.processor(text=[self.chat_text(prompt, dimension, mode)], images=[blank])
        grid = [int(v) for v in enc["image_grid_thw"][0]]
        expected = [1, height // self.spec.patch_size, width // self.spec.patch_size]
        if grid != expected:
            raise ValueError(
                f"image size {height}x{width} is not on the processor grid (the processor makes grid {grid}, "
                f"the differentiable path {expected}); pass the size returned by preprocessing"
            )
        ids = tuple(int(i) for i in enc["input_ids"][0])
        self._cache[key] = ids
        if len(self._cache) > self.max_cache:
            self._cache.popitem(last=False)
        return ids

    def batch(
        self,
        prompts: Sequence[str],
        dimensions: Sequence[str],
        size: tuple[int, int],
        mode: Mode,
        suffixes: Sequence[Sequence[int]] | None = None,
        device: torch.device | str | None = None,
    ) -> ChatBatch:
        """Left-padded ``[N, L]`` ids for N (prompt, dimension[, suffix]) sequences sharing one image size."""
        if len(prompts) != len(dimensions):
            raise ValueError(
                f"got {len(prompts)} prompts but {len(dimensions)} dimensions; give one per sequence"
            )
        if suffixes is not None and len(suffixes) != len(prompts):
            raise ValueError(
                f"got {len(suffixes)} suffixes for {len(prompts)} sequences; give one per sequence"
            )
        rows, suffix_lengths = [], []
        for i, (prompt, dim) in enumerate(zip(prompts, dimensions)):
            suffix = list(suffixes[i]) if suffixes is not None else []
            rows.append(list(self.prompt_ids(prompt, dim, size, mode)) + suffix)
            suffix_lengths.append(len(suffix))
        length = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, length - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, length - len(row) :] = 1
        return ChatBatch(
            input_ids.to(device), attention_mask.to(device), torch.tensor(suffix_lengths, device=device)
        )


class ImageFeatures(NamedTuple):
    """Vision-tower output for N images: merged tokens per image (plus DeepStack features on Qwen3-VL)."""

    output: object  # the tower's ModelOutput; pooler_output is a tuple of [tokens_i, hidden] per image
    grid_thw: torch.Tensor  # [N, 3]
    size: tuple[int, int]  # (H, W) pixels after preprocessing, shared by the batch

    def select(self, index: Sequence[int]) -> ImageFeatures:
        """Features for a sequence batch in which sequence k shows image ``index[k]`` (no recomputation)."""
        index = [int(i) for i in index]
        fields = {"pooler_output": tuple(self.output.pooler_output[i] for i in index)}
        deepstack = getattr(self.output, "deepstack_features", None)
        if deepstack is not None:
            fields["deepstack_features"] = [tuple(level[i] for i in index) for level in deepstack]
        grid = self.grid_thw[torch.as_tensor(index, device=self.grid_thw.device)]
        return ImageFeatures(type(self.output)(**fields), grid, self.size)


class SuffixReadout(NamedTuple):
    """Teacher readout of N sequences ``prompt + suffix`` from one forward pass."""

    token_logprobs: torch.Tensor  # [N, T] log π(suffix_t | prefix), suffixes right-aligned, 0 where masked
    token_mask: torch.Tensor  # [N, T] True on real suffix tokens
    score_logits: torch.Tensor  # [N, S] score-token logits at the end of the suffix
    score_logprobs: torch.Tensor  # [N, S] log π(score token) over the full vocabulary there


def dimension_list(dimensions: str | Sequence[str]) -> list[str]:
    return [dimensions] if isinstance(dimensions, str) else list(dimensions)


class VLMScorer:
    """Reads score distributions from a Qwen-VL model: student (score right after the prompt) and
    teacher (score after a reasoning suffix ending in the score marker).

    In both modes q is read at the position whose next token is the score token: the student's
    answer position (right after the generation prompt), and for the teacher the end of the marker
    as a model writes it before the digit (``Score``, ``:``, `` `` in Qwen's BPE; :func:`marker_variants`).
    ``enable_thinking`` is passed to the chat template of the teacher prompt (see :class:`ScoringInputs`).
    ``readout_chunk``: positions per LM-head call in :meth:`suffix_readout` (:func:`selected_logits`;
    the full ``[N, T, V]`` logits are never held).
    """

    def __init__(
        self,
        model,
        processor,
        grid: ScoreGrid | None = None,
        spec: VisionSpec | None = None,
        enable_thinking: bool = False,
        readout_chunk: int = DEFAULT_CHUNK,
    ):
        self.family = model.config.model_type
        if self.family not in SUPPORTED_FAMILIES:
            raise UnsupportedModelError(
                f"model_type {self.family!r} is not a supported VLM family; supported: {sorted(SUPPORTED_FAMILIES)}"
            )
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.grid = grid if grid is not None else ScoreGrid()
        self.token_ids = self.grid.token_ids(self.tokenizer)  # validates: one token per bin
        self.spec = spec if spec is not None else VisionSpec.from_processor(processor)
        self.inputs = ScoringInputs(processor, self.grid, self.spec, enable_thinking=enable_thinking)
        self.image_token_id = int(model.config.image_token_id)
        self.readout_chunk = int(readout_chunk)

    @cached_property
    def marker_spellings(self) -> list[tuple[int, ...]]:
        """The teacher's score marker as written before the digit (:func:`marker_variants`; validated on
        first use, so a student-only scorer never needs it)."""
        return marker_variants(self.tokenizer, self.grid)

    @property
    def marker_ids(self) -> tuple[int, ...]:
        """``Score: `` as written at the start of a line, right before the score token."""
        return self.marker_spellings[0]

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    def preprocess(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``images [B, 3, H, W]`` in [0, 1] -> ``(pixel_values [sum_patches, C*T*P*P], grid_thw [B, 3])``."""
        return preprocess_images(images, self.spec)

    def image_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> ImageFeatures:
        """One vision-tower pass for all images of the batch."""
        output = self.model.model.get_image_features(pixel_values, grid_thw, return_dict=True)
        grid = grid_thw[0]
        size = (int(grid[1]) * self.spec.patch_size, int(grid[2]) * self.spec.patch_size)
        if not bool((grid_thw == grid).all()):
            raise ValueError(f"all images of a batch must share one size, got grids {grid_thw.tolist()}")
        return ImageFeatures(output, grid_thw, size)

    def encode_images(self, images: torch.Tensor) -> ImageFeatures:
        """Preprocess ``[B, 3, H, W]`` images in [0, 1] and run the vision tower once."""
        images = images.to(self.device)
        return self.image_features(*self.preprocess(images))

    def _lm_inputs(self, features: ImageFeatures, batch: ChatBatch) -> dict:
        """The language model's keyword arguments for ``batch`` on ``features`` (M-RoPE positions)."""
        input_ids, attention_mask = batch.input_ids, batch.attention_mask
        if features.grid_thw.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"{features.grid_thw.shape[0]} images for {input_ids.shape[0]} sequences; select one image "
                f"per sequence with ImageFeatures.select"
            )
        mm_token_type_ids = (input_ids == self.image_token_id).long()  # [N, L], 1 on image pads
        position_ids, _ = self.model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=features.grid_thw,
            attention_mask=attention_mask,
        )  # [3, N, L]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "position_ids": position_ids,
            "mm_encoder_outputs": {"image": features.output},
            "use_cache": False,
        }

    def forward_logits(
        self, features: ImageFeatures, batch: ChatBatch, logits_to_keep: int = 1
    ) -> torch.Tensor:
        """Language-model logits of the last ``logits_to_keep`` positions: ``[N, K, V]``.

        Sequence k shows image k of ``features`` (use :meth:`ImageFeatures.select` to share images).
        For many positions use :meth:`forward_hidden` and :func:`selected_logits` instead.
        """
        return self.model(**self._lm_inputs(features, batch), logits_to_keep=logits_to_keep).logits

    def forward_hidden(self, features: ImageFeatures, batch: ChatBatch, keep: int) -> torch.Tensor:
        """Final (normed) hidden states of the last ``keep`` positions, ``[N, K, H]``: the LM head's input.

        The model's own forward runs (through a prepared wrapper, so DDP syncs its gradients) with no
        position kept for logits and only the last hidden state recorded.
        """
        device = batch.input_ids.device
        out = self.model(
            **self._lm_inputs(features, batch),
            logits_to_keep=torch.empty(0, dtype=torch.long, device=device),
            output_hidden_states=-1,
        )
        return out.hidden_states[-1][:, batch.input_ids.shape[1] - keep :]

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.get_output_embeddings()

    def score_logits(
        self,
        features: ImageFeatures,
        prompts: Sequence[str],
        dimensions: str | Sequence[str],
        mode: Mode = "student",
    ) -> torch.Tensor:
        """Score logits at the answer position for every image and dimension: ``[B, D, S]``.

        ``prompts`` has one prompt per image; all B x D sequences run in one language-model batch on
        the B images' features (no further vision pass).
        """
        dims = list(check_dimensions(dimension_list(dimensions)))
        n_images = features.grid_thw.shape[0]
        if len(prompts) != n_images:
            raise ValueError(f"got {len(prompts)} prompts for {n_images} images; give one prompt per image")
        index = [b for b in range(n_images) for _ in dims]
        logits = self.sequence_score_logits(
            features, [prompts[b] for b in index], dims * n_images, index, mode
        )
        return logits.view(n_images, len(dims), -1)  # [B, D, S]

    def sequence_score_logits(
        self,
        features: ImageFeatures,
        prompts: Sequence[str],
        dimensions: str | Sequence[str],
        image_index: Sequence[int] | None = None,
        mode: Mode = "student",
    ) -> torch.Tensor:
        """Score logits ``[N, S]`` at the answer position of N sequences, sequence n being
        ``(image_index[n], prompts[n], dimensions[n])`` (one dimension name applies to all)."""
        n = len(prompts)
        dims = dimension_list(dimensions)
        dims = dims * n if len(dims) == 1 else dims
        image_index = list(range(n)) if image_index is None else list(image_index)
        if not (len(dims) == len(image_index) == n):
            raise ValueError(
                f"need one dimension and image index per prompt; got {len(dims)} dimensions and "
                f"{len(image_index)} image indices for {n} prompts"
            )
        batch = self.inputs.batch(prompts, dims, features.size, mode, device=self.device)
        logits = self.forward_logits(features.select(image_index), batch, logits_to_keep=1)[:, -1]  # [N, V]
        return gather_score_logits(logits, self.token_ids)  # [N, S]

    def suffix_readout(
        self,
        features: ImageFeatures,
        prompts: Sequence[str],
        dimensions: str | Sequence[str],
        suffix_ids: Sequence[Sequence[int]],
        image_index: Sequence[int] | None = None,
        mode: Mode = "teacher",
    ) -> SuffixReadout:
        """Suffix-token log-probs and the score readout after each suffix, from one forward pass.

        Sequence n is ``prompt_n`` about ``image_index[n]`` (default n) in ``dimensions[n]`` (or one
        dimension for all), followed by ``suffix_ids[n]`` (reasoning + score-marker ids); q is read at
        the end of the suffix. Gradients flow to the model (when trainable) and to the image features.
        """
        n = len(suffix_ids)
        dims = dimension_list(dimensions)
        dims = dims * n if len(dims) == 1 else dims
        image_index = list(range(n)) if image_index is None else list(image_index)
        if not (len(prompts) == len(dims) == len(image_index) == n):
            raise ValueError(
                f"suffix_readout needs one prompt, dimension and image index per suffix; got {len(prompts)} "
                f"prompts, {len(dims)} dimensions, {len(image_index)} image indices for {n} suffixes"
            )
        for k, suffix in enumerate(suffix_ids):
            if self.image_token_id in suffix:
                raise ValueError(
                    f"suffix {k} contains the image pad token id {self.image_token_id}; a suffix holds text "
                    f"tokens only (reasoning and score marker)"
                )
        batch = self.inputs.batch(prompts, dims, features.size, mode, suffixes=suffix_ids, device=self.device)
        t = int(batch.suffix_lengths.max()) if n else 0
        hidden = self.forward_hidden(features.select(image_index), batch, keep=t + 1)  # [N, T+1, H]
        targets = batch.input_ids[:, batch.input_ids.shape[1] - t :]  # [N, T], right-aligned suffixes
        positions = torch.arange(t, device=targets.device)
        token_mask = positions.unsqueeze(0) >= (t - batch.suffix_lengths).unsqueeze(1)  # [N, T]
        token_logits, token_norm = selected_logits(
            self.lm_head, hidden[:, :t], targets.unsqueeze(-1), self.readout_chunk
        )  # [N, T, 1], [N, T]
        token_logprobs = (token_logits.squeeze(-1) - token_norm) * token_mask
        score_ids = torch.tensor(self.token_ids, device=targets.device).expand(n, -1)  # [N, S]
        score_logits, score_norm = selected_logits(
            self.lm_head, hidden[:, -1], score_ids, self.readout_chunk
        )  # [N, S], [N]
        score_logprobs = score_logits - score_norm.unsqueeze(-1)
        return SuffixReadout(token_logprobs, token_mask, score_logits, score_logprobs)

    def __call__(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        dimensions: str | Sequence[str],
        mode: Mode = "student",
    ) -> torch.Tensor:
        """Score logits ``[B, D, S]`` straight from images ``[B, 3, H, W]`` in [0, 1]."""
        return self.score_logits(self.encode_images(images), prompts, dimensions, mode)


def marker_variants(
    tokenizer, grid: ScoreGrid | None = None, marker: str = SCORE_MARKER
) -> list[tuple[int, ...]]:
    """Token-id sequences that spell ``marker`` the way a model writes it right before a score token.

    The marker is everything before the digit in the natural tokenization of ``"Score: 7"``: a real
    Qwen BPE splits it into ``Score``, ``:``, `` ``, ``7``, so the marker ends with the space and q is
    read at the position whose next token is the digit (METHOD.md §2, score position). Byte-level BPEs
    spell a word differently after a space or a newline (" Score" vs "Score"), so the marker is encoded
    after each; a leading whitespace-only token is dropped from a variant. A tokenizer that does not
    write every score token as its own token after the marker (e.g. one that merges " 7") is a
    configuration error: q would have no position to be read at.
    """
    grid = grid if grid is not None else ScoreGrid()
    score_ids = grid.token_ids(tokenizer)
    variants: list[tuple[int, ...]] = []
    for prefix in ("", " ", "\n"):
        spelled = set()
        for token, token_id in zip(grid.tokens, score_ids):
            text = f"{prefix}{marker} {token}"
            ids = tokenizer.encode(text, add_special_tokens=False)
            if len(ids) < 2 or ids[-1] != token_id:
                raise ValueError(
                    f"the tokenizer writes {text!r} as {tokenizer.convert_ids_to_tokens(ids)}, which does not "
                    f"end in the score token {token!r} (id {token_id}); the score is read where the model "
                    f"writes the score token, so each one must follow '{marker} ' as its own token"
                )
            spelled.add(tuple(ids[:-1]))
        if len(spelled) != 1:
            raise ValueError(
                f"the tokenizer spells the marker {prefix + marker!r} differently before different score "
                f"tokens: {sorted(spelled)}; the score tokens {list(grid.tokens)} need one marker spelling"
            )
        ids = spelled.pop()
        if prefix and len(ids) > 1 and not tokenizer.decode(ids[:1]).strip():
            ids = ids[1:]
        if ids not in variants:
            variants.append(ids)
    return variants
