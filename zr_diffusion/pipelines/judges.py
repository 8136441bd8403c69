"""Judges other than Z-Reward, with the reward model's call shape: ``judge(images, prompts).reward``.

Every judge takes images ``[B, 3, H, W]`` float in ``[0, 1]`` and ``B`` prompts and returns
``JudgeOutput(mu [B, D], reward [B])``; ``judge.dimensions`` names the ``D`` columns of ``mu``. Judges
are frozen and stay in eval mode. Pick one by name from the plain dict ``JUDGES`` or with
``load_judge(kind, path)``. Use one that the tuning did not optimise to watch for reward hacking
(METHOD.md §6).

- ``OpenCLIPJudge``: ``100 · cos(image, prompt)`` from an open_clip model; differentiable w.r.t. the
  images (its own tensor preprocessing), so it also serves as a training reward.
- ``CLIPScoreJudge``: torchmetrics' ``CLIPScore`` per image, ``max(100 · cos, 0)``, on a transformers
  CLIP model; evaluation only (the processor works on uint8 copies, no gradient).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class JudgeOutput(NamedTuple):
    mu: torch.Tensor  # [B, D] per-dimension score
    reward: torch.Tensor  # [B] aggregate (here D = 1, so mu[:, 0])


def _check_inputs(images: torch.Tensor, prompts: list[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be [B, 3, H, W] in [0, 1], got shape {tuple(images.shape)}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a str" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"need one prompt per image: {images.shape[0]} images, prompts is {n}")


# ---------------------------------------------------------------- open_clip

# Tiny ViT + text transformer. The text tower keeps open_clip's BPE vocabulary size (49408) so the
# packaged SimpleTokenizer works unchanged; everything else is a few channels.
TINY_OPENCLIP_CFG: dict[str, Any] = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
_OPENCLIP_CONFIG = "open_clip_config.json"  # open_clip's own local-dir / hf-hub layout
_OPENCLIP_WEIGHTS = "open_clip_model.safetensors"


def _register_config(config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Register a model config dict with open_clip under a content-hashed name.

    Accepts a bare model config (embed_dim, vision_cfg, text_cfg) or open_clip_config.json's layout
    ({"model_cfg": ..., "preprocess_cfg": ...}); returns (name, preprocess_cfg).
    """
    import open_clip

    model_cfg = config.get("model_cfg", config)
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in model_cfg]
    if missing:
        raise ValueError(f"open_clip model config lacks {missing}; it needs embed_dim, vision_cfg, text_cfg")
    text = json.dumps(model_cfg, sort_keys=True)
    name = "zr-" + hashlib.sha256(text.encode()).hexdigest()[:16]
    if name not in open_clip.list_models():
        # open_clip keeps registered configs in memory, so the file may go once it has been read
        with tempfile.TemporaryDirectory(prefix="zr_openclip_cfg_") as tmp:
            (Path(tmp) / f"{name}.json").write_text(text)
            open_clip.add_model_config(Path(tmp) / f"{name}.json")
    return name, dict(config.get("preprocess_cfg", {}))


def _create_openclip(model_name_or_config: str | Path | dict, pretrained: str | Path | None):
    """(model, tokenizer) through open_clip's own loaders; never returns randomly initialised weights."""
    import open_clip

    if isinstance(model_name_or_config, dict) or str(model_name_or_config).endswith(".json"):
        cfg = model_name_or_config
        if not isinstance(cfg, dict):
            cfg = json.loads(Path(cfg).read_text())
        name, preprocess = _register_config(cfg)
        if pretrained is None:
            raise ValueError("a model config needs pretrained=<weights file> (else the judge is random)")
        model = open_clip.create_model(name, pretrained=str(pretrained), force_preprocess_cfg=preprocess)
        return model, open_clip.get_tokenizer(name)
    if Path(model_name_or_config).is_dir():  # open_clip_config.json + weights, e.g. make_tiny's folder
        source = f"local-dir:{Path(model_name_or_config).resolve()}"
        if pretrained is None and not any(Path(model_name_or_config).glob("*.safetensors")):
            raise FileNotFoundError(f"{model_name_or_config} has no .safetensors weights; pass pretrained=")
        model = open_clip.create_model(source)
        if pretrained is not None:
            open_clip.load_checkpoint(model, str(pretrained))
        return model, open_clip.get_tokenizer(source)
    name = str(model_name_or_config)
    if name not in open_clip.list_models():
        close = difflib.get_close_matches(name, open_clip.list_models(), n=5)
        raise ValueError(
            f"{name!r} is neither a folder, a config (.json / dict) nor an open_clip model name; "
            f"close names: {close} (all: open_clip.list_models())"
        )
    if pretrained is None:
        raise ValueError(
            f"{name}: pass pretrained=<weights file or open_clip tag> (else the judge is random)"
        )
    model = open_clip.create_model(name, pretrained=str(pretrained))
    return model, open_clip.get_tokenizer(name)


class OpenCLIPJudge(nn.Module):
    """CLIP score ``100 · cos(E_image, E_prompt)`` from an open_clip model, differentiable w.r.t. images.

    Not clamped at 0 (torchmetrics' CLIPScore is ``max(100 · cos, 0)``; equal whenever cos ≥ 0), so
    the gradient never vanishes on poorly matching images. Images go through the model's own
    preprocessing in tensor ops: resize (shortest side, or squash) to its image size, centre crop,
    normalise with its mean / std.
    """

    dimensions = ("clip_score",)

    def __init__(self, model: nn.Module, tokenizer, scale: float = 100.0):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.scale = scale
        cfg = self.model.visual.preprocess_cfg
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        self.resize_mode = cfg.get("resize_mode", "shortest")
        if self.resize_mode not in ("shortest", "squash"):
            raise ValueError(f"resize_mode {self.resize_mode!r} is not supported; valid: shortest, squash")
        interp = cfg.get("interpolation", "bicubic")
        if interp not in ("bicubic", "bilinear"):
            raise ValueError(f"interpolation {interp!r} is not supported; valid: bicubic, bilinear")
        self.interpolation = interp
        self.register_buffer("mean", torch.tensor(cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.eval()

    @classmethod
    def from_pretrained(
        cls,
        model_name_or_config: str | Path | dict,
        pretrained: str | Path | None = None,
        *,
        scale: float = 100.0,
        device: str | torch.device = "cpu",
    ) -> OpenCLIPJudge:
        """Load an open_clip model, frozen and in eval mode.

        model_name_or_config: a folder in open_clip's layout (open_clip_config.json + weights, as
            ``make_tiny`` writes; ``pretrained`` then optionally overrides the weights), a model config
            dict or .json file, or a built-in open_clip name such as ``"ViT-B-32"``.
        pretrained: a weights file (.safetensors preferred; open_clip's .bin/.pt checkpoints also load)
            or an open_clip tag (needs the weights in the local hub cache when offline).
        """
        model, tokenizer = _create_openclip(model_name_or_config, pretrained)
        return cls(model, tokenizer, scale=scale).to(device)

    @staticmethod
    def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
        """Write a tiny random open_clip model (config JSON + safetensors) that from_pretrained reads."""
        import open_clip

        from zr_diffusion.io import atomic_save_safetensors, atomic_write_json

        name, _ = _register_config(TINY_OPENCLIP_CFG)
        torch.manual_seed(seed)
        model = open_clip.create_model(name)
        out = Path(out_dir)
        preprocess = {k: model.visual.preprocess_cfg[k] for k in ("size", "mean", "std", "interpolation")}
        atomic_save_safetensors(model.state_dict(), out / _OPENCLIP_WEIGHTS)
        atomic_write_json(
            out / _OPENCLIP_CONFIG, {"model_cfg": TINY_OPENCLIP_CFG, "preprocess_cfg": preprocess}
        )
        return out

    def train(self, mode: bool = True) -> OpenCLIPJudge:
        return super().train(False)  # a judge stays in eval mode inside a module put in train mode

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, 3, h, w] normalised model input, differentiable."""
        th, tw = self.image_size
        h, w = images.shape[-2:]
        if self.resize_mode == "shortest":
            s = max(th / h, tw / w)
            nh, nw = max(th, round(h * s)), max(tw, round(w * s))
        else:
            nh, nw = th, tw
        if (nh, nw) != (h, w):
            images = F.interpolate(images, size=(nh, nw), mode=self.interpolation, antialias=True)
        top, left = (nh - th) // 2, (nw - tw) // 2
        images = images[..., top : top + th, left : left + tw]  # centre crop
        return (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> JudgeOutput:
        _check_inputs(images, prompts)
        dtype = next(self.model.parameters()).dtype
        pixels = self.preprocess(images.to(dtype))
        img = F.normalize(self.model.encode_image(pixels), dim=-1)  # [B, E]
        with torch.no_grad():  # prompts are not differentiable inputs
            tokens = self.tokenizer(list(prompts)).to(images.device)  # [B, L]
            txt = F.normalize(self.model.encode_text(tokens), dim=-1)  # [B, E]
        mu = self.scale * (img * txt).sum(-1, keepdim=True)  # [B, 1]
        return JudgeOutput(mu=mu, reward=mu[:, 0])


# ---------------------------------------------------------------- torchmetrics CLIPScore


def _tiny_clip_tokenizer_files(out: Path) -> None:
    """vocab.json / merges.txt: byte-level CLIP vocabulary (every byte a token) plus a few merges."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")]
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    tokens += ["".join(m) for m in merges]
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


class _TensorFeatures(nn.Module):
    """A CLIPModel whose get_*_features return tensors, as torchmetrics <= 1.9 expects.

    transformers >= 5 returns BaseModelOutputWithPooling (projected features in ``pooler_output``),
    which torchmetrics 1.9 calls ``.norm`` on (fixed upstream in Lightning-AI/torchmetrics#3408).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.config = model.config  # torchmetrics reads text_config.max_position_embeddings

    @staticmethod
    def _tensor(out) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def _load_hf_clip(path: str):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(path).eval()
    return _TensorFeatures(model), CLIPProcessor.from_pretrained(path)


class CLIPScoreJudge(nn.Module):
    """torchmetrics ``CLIPScore`` per image: ``max(100 · cos(E_image, E_prompt), 0)``.

    Evaluation only: the processor resizes uint8 copies of the images, so no gradient reaches them;
    use ``OpenCLIPJudge`` for a differentiable CLIP reward.
    """

    dimensions = ("clip_score",)

    def __init__(self, metric):
        super().__init__()
        self.metric = metric.eval().requires_grad_(False)
        self.eval()

    @classmethod
    def from_pretrained(cls, model_name_or_path: str | Path, *, device: str | torch.device = "cpu"):
        """A transformers CLIP model: a local folder (CLIPModel + CLIPProcessor) or a hub id.

        Passed to CLIPScore as its documented loader callable returning (model, processor): as a
        string, torchmetrics 1.9 accepts only hub ids containing "openai"/"jinaai"/"zer0int", and the
        callable also adapts transformers 5's feature outputs (see ``_TensorFeatures``).
        """
        from torchmetrics.multimodal.clip_score import CLIPScore

        path = str(model_name_or_path)
        return cls(CLIPScore(model_name_or_path=lambda: _load_hf_clip(path))).to(device)

    @staticmethod
    def make_tiny(out_dir: str | Path, seed: int = 0) -> Path:
        """Write a tiny random transformers CLIPModel + CLIPProcessor (local tokenizer files) to a folder."""
        from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

        from zr_diffusion.io import write_dir_atomically

        def write(tmp: Path) -> None:
            _tiny_clip_tokenizer_files(tmp)
            tok = CLIPTokenizer(vocab=str(tmp / "vocab.json"), merges=str(tmp / "merges.txt"))
            ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
            text = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1)
            text |= dict(
                num_attention_heads=2, max_position_embeddings=77, pad_token_id=tok.pad_token_id, **ids
            )
            vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2)
            vision |= dict(image_size=32, patch_size=8)
            torch.manual_seed(seed)
            CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
                tmp
            )
            image_processor = CLIPImageProcessor(
                size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
            )
            CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(tmp)

        return write_dir_atomically(out_dir, write)

    def train(self, mode: bool = True) -> CLIPScoreJudge:
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: list[str]) -> JudgeOutput:
        _check_inputs(images, prompts)
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # processor rescales
        scores = []
        for image, prompt in zip(pixels, prompts):  # the metric's public API yields a batch mean
            self.metric.reset()
            self.metric.update(image, prompt)
            scores.append(self.metric.compute())
        self.metric.reset()
        mu = torch.stack(scores).to(images.device).float()[:, None]  # [B, 1]
        return JudgeOutput(mu=mu, reward=mu[:, 0])


# ---------------------------------------------------------------- picking a judge by name

JUDGES: dict[str, type[nn.Module]] = {"openclip": OpenCLIPJudge, "clipscore": CLIPScoreJudge}


def load_judge(kind: str, path: str | Path | dict, **kwargs) -> nn.Module:
    """``JUDGES[kind].from_pretrained(path, **kwargs)``, with an error listing the valid kinds."""
    if kind not in JUDGES:
        raise ValueError(f"unknown judge kind {kind!r}; valid kinds: {sorted(JUDGES)}")
    return JUDGES[kind].from_pretrained(path, **kwargs)
