"""The real Qwen tokenizer (from dashscope's qwen.tiktoken) and a tiny Qwen2-VL on it: where the score
is read, chat templates that open <think>, and rollouts sampled exactly from π_old (issue 8, items 1-4)."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests._vlm_fixtures import qwen_tokenizer, real_tokenizer_vlm_dir, tiny_vlm_dir  # noqa: E402
from zr_diffusion.vlm.loading import load_vlm  # noqa: E402
from zr_diffusion.vlm.readout import VLMScorer  # noqa: E402
from zr_diffusion.vlm.reasoning import generate_reasoning  # noqa: E402
from zr_diffusion.vlm.tiny import CHAT_TEMPLATE, make_tiny_vlm  # noqa: E402

PROMPT = "a red circle above a blue square"
SIDE = 56  # 2 x 2 merged tokens at patch 14


@pytest.fixture(scope="module")
def real_scorer():
    vlm, processor = load_vlm(real_tokenizer_vlm_dir())
    return VLMScorer(vlm.eval(), processor)


def _forcing(ids: list[int], prompt_length: int):
    """A logits processor that makes generation write ``ids`` (then repeat the last one)."""

    def force(input_ids, scores):
        step = input_ids.shape[1] - prompt_length
        out = torch.full_like(scores, -1e9)
        out[:, ids[min(step, len(ids) - 1)]] = 0
        return out

    return force


# ----------------------------------------------------------------------------- item 1: the tokenizer


def test_real_qwen_tokenizer_ids():
    tok = qwen_tokenizer()
    assert len(tok) == 151657
    assert tok.encode("Score: 7", add_special_tokens=False) == [10570, 25, 220, 22]
    assert [tok.encode(str(d), add_special_tokens=False) for d in range(1, 10)] == [
        [i] for i in range(16, 25)
    ]
    special = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
    special |= {"<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|vision_pad|>": 151654}
    special |= {"<|image_pad|>": 151655, "<|video_pad|>": 151656}
    assert {t: tok.convert_tokens_to_ids(t) for t in special} == special


def test_tiny_qwen2_vl_on_the_real_tokenizer(real_scorer):
    model = real_scorer.model
    assert model.config.model_type == "qwen2_vl" and model.config.text_config.hidden_size == 32
    assert model.config.text_config.vocab_size >= 151657 and model.config.image_token_id == 151655
    assert real_scorer.token_ids == list(range(16, 25))  # "1".."9"
    feats = real_scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    assert real_scorer.score_logits(feats, [PROMPT], ["realism", "alignment"]).shape == (1, 2, 9)


# ----------------------------------------------------------------------------- item 2: the score position


def test_teacher_reads_q_at_the_position_that_predicts_the_digit(real_scorer):
    """The model writes "... Score: 7" (' Score', ':', ' ', '7'): generation stops after the space, and q
    is the model's score-token logits at the position whose next token is '7'."""
    scorer, tok = real_scorer, real_scorer.tokenizer
    assert scorer.marker_ids == (10570, 25, 220) and (18115, 25, 220) in scorer.marker_spellings
    written = tok.encode("The image shows a red circle. Score: 7", add_special_tokens=False)
    assert written[-4:] == [18115, 25, 220, 22]  # " Score" after the full stop
    feats = scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    prompt = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "teacher")
    force = _forcing(written, prompt.input_ids.shape[1])
    (sample,) = generate_reasoning(
        scorer, feats, [PROMPT], "realism", max_new_tokens=40, logits_processor=[force]
    )[0]
    assert not sample.marker_appended and sample.token_ids == written[:-1]
    assert sample.num_generated_tokens == len(written) - 1 and sample.text == "The image shows a red circle."
    # the model's own logits over prompt + the whole continuation, at the position that predicts '7'
    full = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "teacher", suffixes=[written])
    with torch.no_grad():
        logits = scorer.forward_logits(feats, full, logits_to_keep=2)[
            0
        ]  # [2, V]: predicts '7', then after it
    assert torch.allclose(sample.score_logits, logits[0, scorer.token_ids], atol=1e-5)
    assert not torch.allclose(sample.score_logits, logits[1, scorer.token_ids], atol=1e-3)


def test_appended_marker_ends_where_the_digit_is_written(real_scorer):
    scorer, tok = real_scorer, real_scorer.tokenizer
    feats = scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    torch.manual_seed(0)
    (sample,) = generate_reasoning(scorer, feats, [PROMPT], "realism", max_new_tokens=2)[0]
    assert sample.marker_appended and sample.num_generated_tokens == 2
    assert tuple(sample.token_ids[-3:]) == (10570, 25, 220)
    assert tok.decode(sample.token_ids[-3:]) + "7" == "Score: 7"
    assert tok.encode("Score: 7", add_special_tokens=False) == sample.token_ids[-3:] + [22]


def test_student_answer_position_predicts_the_digit_directly(real_scorer):
    scorer, tok = real_scorer, real_scorer.tokenizer
    text = scorer.inputs.chat_text(PROMPT, "realism", "student")
    ids = list(scorer.inputs.prompt_ids(PROMPT, "realism", (SIDE, SIDE), "student"))
    assert tok.decode(ids[-3:]) == "<|im_start|>assistant\n"
    # natural tokenization of the prompt followed by the answer "7": the digit comes right after the prompt
    answered = tok.encode(text + "7", add_special_tokens=False)
    assert answered[-1] == 22 and answered[:-1] == tok.encode(text, add_special_tokens=False)
    feats = scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    batch = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "student")
    with torch.no_grad():
        last = scorer.forward_logits(feats, batch)[0, -1]  # [V], the position after "assistant\n"
        q = scorer.score_logits(feats, [PROMPT], "realism")[0, 0]
    assert torch.allclose(q, last[scorer.token_ids], atol=1e-6)


# ----------------------------------------------------------------------------- item 3: thinking templates

# Qwen3-style: the generation prompt opens <think> unless enable_thinking is false (then an empty block)
THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\n\n</think>\n\n' -}}"
    "{%- else -%}{{- '<think>\n' -}}{%- endif -%}{%- endif -%}",
)
ALWAYS_THINK_TEMPLATE = CHAT_TEMPLATE.replace(
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}",
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n<think>\n' -}}{%- endif -%}",
)
assert THINK_TEMPLATE != CHAT_TEMPLATE != ALWAYS_THINK_TEMPLATE


@pytest.fixture(scope="module")
def think_model(tmp_path_factory):
    folder = make_tiny_vlm(tmp_path_factory.mktemp("think"), "qwen2_vl", chat_template=THINK_TEMPLATE)
    return load_vlm(folder)


def test_student_never_reads_inside_an_open_think_block(think_model):
    vlm, processor = think_model
    for thinking in (False, True):
        scorer = VLMScorer(vlm, processor, enable_thinking=thinking)
        student = scorer.inputs.chat_text(PROMPT, "realism", "student")
        assert student.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        ids = scorer.inputs.prompt_ids(PROMPT, "realism", (SIDE, SIDE), "student")
        assert scorer.tokenizer.decode(ids).endswith("</think>\n\n")


def test_teacher_reasoning_may_think(think_model):
    vlm, processor = think_model
    on = VLMScorer(vlm, processor, enable_thinking=True).inputs.chat_text(PROMPT, "realism", "teacher")
    off = VLMScorer(vlm, processor, enable_thinking=False).inputs.chat_text(PROMPT, "realism", "teacher")
    assert on.endswith("assistant\n<think>\n") and off.endswith("assistant\n<think>\n\n</think>\n\n")


def _forced_teacher_sample(scorer, text: str, max_new_tokens: int = 60):
    ids = scorer.tokenizer.encode(text, add_special_tokens=False)
    feats = scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    prompt = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "teacher")
    force = _forcing(ids, prompt.input_ids.shape[1])
    samples = generate_reasoning(
        scorer, feats, [PROMPT], "realism", max_new_tokens=max_new_tokens, logits_processor=[force]
    )
    return ids, samples[0][0]


def test_teacher_score_inside_an_open_think_block_does_not_count(think_model):
    """The template opened <think>: a "Score: 2" the model writes while thinking is not the score;
    q is read after the block closes, where the model writes "Score: 7"."""
    vlm, processor = think_model
    scorer = VLMScorer(vlm, processor, enable_thinking=True)
    ids, sample = _forced_teacher_sample(scorer, "Maybe Score: 2 at most.\n</think>\n\nScore: 7")
    assert not sample.marker_appended and sample.token_ids == ids[:-1]
    assert sample.text.startswith("Maybe Score: 2") and sample.text.endswith("</think>\n\n")


def test_appended_marker_closes_an_open_think_block(think_model):
    vlm, processor = think_model
    scorer = VLMScorer(vlm, processor, enable_thinking=True)
    ids, sample = _forced_teacher_sample(scorer, "Maybe Score: 2 at most", max_new_tokens=8)
    assert sample.marker_appended and sample.num_generated_tokens == 8
    tail = scorer.tokenizer.decode(sample.token_ids[sample.sampled_length :])
    assert tail == "\n</think>\n\nScore: " and sample.sampled_length == 8
    # without thinking the same text is scored at its first marker
    plain = VLMScorer(vlm, processor, enable_thinking=False)
    ids, sample = _forced_teacher_sample(plain, "Maybe Score: 2 at most", max_new_tokens=8)
    assert not sample.marker_appended and scorer.tokenizer.decode(sample.token_ids) == "Maybe Score: "


def test_template_that_always_opens_think_is_refused_for_the_student(tmp_path):
    folder = tiny_vlm_dir("qwen2_vl")
    shutil.copytree(folder, tmp_path / "m")
    (tmp_path / "m" / "chat_template.jinja").write_text(ALWAYS_THINK_TEMPLATE)
    vlm, processor = load_vlm(tmp_path / "m")
    scorer = VLMScorer(vlm, processor)
    assert scorer.inputs.chat_text(PROMPT, "realism", "teacher").endswith("<think>\n")
    with pytest.raises(ValueError, match="<think> block open at the student's answer position"):
        scorer.inputs.chat_text(PROMPT, "realism", "student")


def test_enable_thinking_is_a_config_value():
    from zr_diffusion.reward.config import EvalRewardConfig, RewardDataConfig, TrainRewardConfig

    cfg = TrainRewardConfig(model="m", data=RewardDataConfig(train="t.jsonl"), enable_thinking=True)
    assert cfg.enable_thinking and not EvalRewardConfig(model="m", data="d.jsonl").enable_thinking


# ----------------------------------------------------------------------------- item 4: sampling π_old


def _checkpoint_with(tmp_path, **fields):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_vlm_dir("qwen2_vl"), folder)
    path = folder / "generation_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | fields))
    return folder


class _Recorder:
    """Records what the sampler sees at each step (after generate()'s own logits processors)."""

    def __init__(self):
        self.scores, self.input_ids = [], None

    def __call__(self, input_ids, scores):
        self.scores.append(scores.detach().clone())
        self.input_ids = input_ids.detach().clone()
        return scores


def test_rollouts_ignore_the_checkpoints_repetition_penalty(tmp_path):
    """A checkpoint whose generation_config.json sets repetition_penalty: 1.05: the logits the sampler
    draws from are exactly the model's own logits (π_old), so the sampled tokens' log-probs match the
    unpenalised policy's teacher-forced log-probs."""
    vlm, processor = load_vlm(_checkpoint_with(tmp_path, repetition_penalty=1.05))
    assert vlm.generation_config.repetition_penalty == 1.05
    scorer = VLMScorer(vlm.eval(), processor)
    feats = scorer.encode_images(torch.rand(1, 3, SIDE, SIDE))
    prompt = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "teacher")
    recorder = _Recorder()
    torch.manual_seed(0)
    generate_reasoning(scorer, feats, [PROMPT], "realism", max_new_tokens=12, logits_processor=[recorder])
    steps = len(recorder.scores)
    assert steps >= 4
    generated = recorder.input_ids[0, prompt.input_ids.shape[1] :].tolist()  # the first steps - 1 tokens
    full = scorer.inputs.batch([PROMPT], ["realism"], feats.size, "teacher", suffixes=[generated])
    with torch.no_grad():
        logits = scorer.forward_logits(feats, full, logits_to_keep=steps)[0]  # [steps, V]
    seen = torch.cat(recorder.scores)  # [steps, V]
    sampleable = torch.isfinite(seen)  # the vision placeholders are never sampled
    assert sampleable.sum() > steps * 900
    assert torch.allclose(seen[sampleable], logits[sampleable], atol=1e-4)


@pytest.mark.parametrize(
    "field, value", [("bad_words_ids", [[5]]), ("sequence_bias", {"[5]": -1.0}), ("min_p", 0.1)]
)
def test_rollouts_refuse_a_checkpoint_field_without_a_neutral_value(tmp_path, field, value):
    vlm, processor = load_vlm(_checkpoint_with(tmp_path, **{field: value}))
    scorer = VLMScorer(vlm.eval(), processor)
    with pytest.raises(ValueError, match=f"generation_config.json sets {field}="):
        generate_reasoning(scorer, torch.rand(1, 3, SIDE, SIDE), [PROMPT], "realism", max_new_tokens=2)


class _MergingTokenizer:
    """A tokenizer that writes " 7" as one token (like many non-Qwen BPEs): "Score: 7" -> "Score:", " 7"."""

    unk_token_id = None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        import re

        return [self.vocab.setdefault(piece, len(self.vocab)) for piece in re.findall(r"\s?\S+|\s+", text)]

    def convert_ids_to_tokens(self, ids):
        inverse = {v: k for k, v in self.vocab.items()}
        return [inverse[i] for i in ids]


def test_a_tokenizer_that_merges_the_space_into_the_digit_is_a_configuration_error():
    from zr_diffusion.vlm.readout import marker_variants

    with pytest.raises(ValueError, match=r"does not end in the score token '1'"):
        marker_variants(_MergingTokenizer())


def test_marker_variants_of_the_real_tokenizer():
    from zr_diffusion.vlm.readout import marker_variants

    # at a line start, after a space (" Score" is one token), after a newline
    assert marker_variants(qwen_tokenizer()) == [(10570, 25, 220), (18115, 25, 220)]
