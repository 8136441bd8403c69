"""Tiny offline VLMs: every family builds, saves and loads back through load_vlm; score tokens."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from tests._vlm_fixtures import FAMILIES, tiny_vlm_dir  # noqa: E402
from zr_diffusion.scores import ScoreGrid, ScoreTokenError, score_token_ids  # noqa: E402
from zr_diffusion.vlm.loading import SUPPORTED_FAMILIES, UnsupportedModelError, load_vlm, resolve_dtype  # noqa: E402
from zr_diffusion.vlm.readout import VLMScorer  # noqa: E402
from zr_diffusion.vlm.tiny import build_tiny_tokenizer, make_tiny_vlm  # noqa: E402

PROCESSORS = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "qwen3_5": "Qwen3VLProcessor",
}


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_family_saves_and_loads_back(family):
    path = tiny_vlm_dir(family)
    assert (path / "model.safetensors").is_file()
    model, processor = load_vlm(path)
    assert type(model).__name__ == SUPPORTED_FAMILIES[family]
    assert type(processor).__name__ == PROCESSORS[family]
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessor"
    assert not model.training
    # config token ids are the tokenizer's
    tok = processor.tokenizer
    assert model.config.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert model.config.vision_start_token_id == tok.convert_tokens_to_ids("<|vision_start|>")
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    # the real processor path runs end to end on the loaded pair
    patch = 14 if family.startswith("qwen2") else 16
    assert processor.image_processor.patch_size == patch
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate it."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    enc = processor(
        text=[text], images=[Image.new("RGB", (4 * patch, 4 * patch), "red")], return_tensors="pt"
    )
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 4  # (4 x 4 patches) / merge 2x2
    with torch.no_grad():
        logits = model(**enc).logits
    assert torch.isfinite(logits).all()


def test_small_is_larger_than_tiny_and_same_tokenizer():
    tiny, p_tiny = load_vlm(tiny_vlm_dir("qwen3_5", "tiny"))
    small, p_small = load_vlm(tiny_vlm_dir("qwen3_5", "small"))
    assert sum(p.numel() for p in small.parameters()) > 2 * sum(p.numel() for p in tiny.parameters())
    assert p_tiny.tokenizer.get_vocab() == p_small.tokenizer.get_vocab()  # teacher and student share it
    assert "linear_attention" in small.config.text_config.layer_types


def test_seed_makes_weights_reproducible(tmp_path):
    a = make_tiny_vlm(tmp_path / "a", "qwen2_vl", seed=3)
    b = make_tiny_vlm(tmp_path / "b", "qwen2_vl", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen3_5"])
def test_digits_are_single_tokens(family):
    tok = build_tiny_tokenizer(family)
    ids = score_token_ids(tok, [str(d) for d in range(1, 10)])
    assert len(set(ids)) == 9
    assert ScoreGrid().token_ids(tok) == ids


def test_multi_piece_score_token_is_a_clear_error():
    _, processor = load_vlm(tiny_vlm_dir("qwen2_vl"))
    grid = ScoreGrid(tokens=("1", "2", "3", "4", "5", "6", "7", "8", "99"))
    with pytest.raises(ScoreTokenError, match=r"'99' is not a single token.*2 pieces"):
        score_token_ids(processor.tokenizer, grid.tokens)
    model, _ = load_vlm(tiny_vlm_dir("qwen2_vl"))
    with pytest.raises(ScoreTokenError, match="'99'"):
        VLMScorer(model, processor, grid)


def test_unknown_model_type_names_it_and_the_supported_ones(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    ).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*qwen2_5_vl.*qwen3_5"):
        load_vlm(tmp_path)


def test_load_vlm_dtype():
    model, _ = load_vlm(tiny_vlm_dir("qwen2_vl"), dtype="float64")
    assert next(model.parameters()).dtype == torch.float64
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        resolve_dtype("int8")
