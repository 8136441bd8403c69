"""Judges: tiny models built offline, saved, loaded back through from_pretrained; shapes and gradients."""

import json

import pytest
import torch
import torch.nn.functional as F

from zr_diffusion.pipelines.judges import (
    JUDGES,
    CLIPScoreJudge,
    JudgeOutput,
    OpenCLIPJudge,
    load_judge,
)

PROMPTS = ["a red cube on a table", "the sky and a cat"]


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory):
    return OpenCLIPJudge.make_tiny(tmp_path_factory.mktemp("openclip") / "tiny", seed=0)


@pytest.fixture(scope="module")
def clipscore_dir(tmp_path_factory):
    return CLIPScoreJudge.make_tiny(tmp_path_factory.mktemp("clipscore") / "tiny", seed=0)


def _images(b=2, h=40, w=48, seed=0):
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- OpenCLIPJudge


def test_openclip_tiny_writes_config_and_safetensors(openclip_dir):
    names = {p.name for p in openclip_dir.iterdir()}
    assert names == {"open_clip_config.json", "open_clip_model.safetensors"}
    cfg = json.loads((openclip_dir / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["vision_cfg"]["image_size"] == 32


def test_openclip_loads_frozen_and_scores_shapes(openclip_dir):
    judge = load_judge("openclip", openclip_dir)
    assert isinstance(judge, OpenCLIPJudge) and judge.dimensions == ("clip_score",)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    judge.train()  # a judge inside a module put in train mode stays in eval mode
    assert not judge.training and not judge.model.training
    out = judge(_images(), PROMPTS)
    assert isinstance(out, JudgeOutput)
    assert out.mu.shape == (2, 1) and out.reward.shape == (2,)
    assert torch.equal(out.reward, out.mu[:, 0])
    assert (out.reward.abs() <= 100 + 1e-4).all()  # 100 · cosine


def test_openclip_reward_is_100_cosine_of_model_embeddings(openclip_dir):
    import open_clip

    judge = OpenCLIPJudge.from_pretrained(openclip_dir)
    images = _images(h=32, w=32)  # already the model's size: preprocessing only normalises
    mean, std = torch.tensor(open_clip.OPENAI_DATASET_MEAN), torch.tensor(open_clip.OPENAI_DATASET_STD)
    pixels = (images - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    img = judge.model.encode_image(pixels)
    txt = judge.model.encode_text(open_clip.get_tokenizer("ViT-B-32", context_length=16)(PROMPTS))
    expected = 100 * F.cosine_similarity(img, txt, dim=-1)
    torch.testing.assert_close(judge(images, PROMPTS).reward, expected, atol=1e-4, rtol=1e-4)


def test_openclip_preprocess_resizes_shortest_side_and_centre_crops(openclip_dir):
    judge = OpenCLIPJudge.from_pretrained(openclip_dir)
    assert judge.preprocess(_images(h=40, w=96)).shape == (2, 3, 32, 32)
    assert judge.preprocess(_images(h=16, w=16)).shape == (2, 3, 32, 32)


def test_openclip_gradient_reaches_images_and_no_parameter(openclip_dir):
    judge = OpenCLIPJudge.from_pretrained(openclip_dir)
    images = _images().requires_grad_(True)
    judge(images, PROMPTS).reward.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and images.grad.isfinite().all()
    assert all(p.grad is None for p in judge.parameters())


def test_openclip_loads_from_config_dict_or_json_plus_weights_file(openclip_dir, tmp_path):
    images = _images()
    ref = OpenCLIPJudge.from_pretrained(openclip_dir)(images, PROMPTS).reward
    cfg = json.loads((openclip_dir / "open_clip_config.json").read_text())
    weights = openclip_dir / "open_clip_model.safetensors"
    from_dict = OpenCLIPJudge.from_pretrained(cfg, pretrained=weights)
    (tmp_path / "model.json").write_text(json.dumps(cfg["model_cfg"]))
    from_json = OpenCLIPJudge.from_pretrained(tmp_path / "model.json", pretrained=str(weights))
    torch.testing.assert_close(from_dict(images, PROMPTS).reward, ref)
    torch.testing.assert_close(from_json(images, PROMPTS).reward, ref)


def test_openclip_errors_name_the_problem(openclip_dir, tmp_path):
    cfg = json.loads((openclip_dir / "open_clip_config.json").read_text())
    with pytest.raises(ValueError, match="pretrained"):
        OpenCLIPJudge.from_pretrained(cfg)  # would be a random judge
    with pytest.raises(ValueError, match="pretrained"):
        OpenCLIPJudge.from_pretrained("ViT-B-32")
    with pytest.raises(ValueError, match="ViT-B-32"):
        OpenCLIPJudge.from_pretrained("ViT-B-3", pretrained="x.safetensors")  # close names listed
    (tmp_path / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        OpenCLIPJudge.from_pretrained(tmp_path)
    judge = OpenCLIPJudge.from_pretrained(openclip_dir)
    with pytest.raises(ValueError, match="one prompt per image"):
        judge(_images(), PROMPTS[:1])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        judge(torch.rand(3, 32, 32), PROMPTS)


# ---------------------------------------------------------------- CLIPScoreJudge


def test_clipscore_tiny_folder_has_model_and_local_tokenizer(clipscore_dir):
    names = {p.name for p in clipscore_dir.iterdir()}
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= names


def test_clipscore_loads_through_torchmetrics_and_matches_hand_computation(clipscore_dir):
    from torchmetrics.multimodal.clip_score import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    judge = load_judge("clipscore", clipscore_dir)
    assert isinstance(judge.metric, CLIPScore) and judge.dimensions == ("clip_score",)
    assert not judge.training and not any(p.requires_grad for p in judge.parameters())
    images = _images(b=3, seed=1)
    prompts = [*PROMPTS, "and the"]
    out = judge(images, prompts)
    assert out.mu.shape == (3, 1) and out.reward.shape == (3,) and not out.reward.requires_grad
    # by hand: max(100 · cos, 0) per image, uint8 images through the same processor
    model, proc = CLIPModel.from_pretrained(clipscore_dir), CLIPProcessor.from_pretrained(clipscore_dir)
    u8 = (images * 255).round().to(torch.uint8)
    with torch.no_grad():
        img = model.get_image_features(**proc(images=list(u8), return_tensors="pt")).pooler_output
        tok = proc(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(tok["input_ids"], tok["attention_mask"]).pooler_output
    expected = (100 * F.cosine_similarity(img, txt, dim=-1)).clamp(min=0)
    torch.testing.assert_close(out.reward, expected, atol=1e-4, rtol=1e-4)


def test_load_judge_unknown_kind_lists_valid_kinds():
    assert set(JUDGES) == {"openclip", "clipscore"}
    with pytest.raises(ValueError, match=r"\['clipscore', 'openclip'\]"):
        load_judge("pickscore", "somewhere")
