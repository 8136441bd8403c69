"""The demo's text-to-image generator, trained here from scratch on world images (``zr demo``).

A tiny Stable Diffusion pipeline (the real diffusers classes) starts from random weights. Nothing
about it is pretrained, so it is trained in two phases on renders of the training prompts with the
generator's own defect rate (``defect_prob``, below the world's: cleaner samples, still with some
defects for SFT and Z-Reward to remove):

1. the VAE as an autoencoder: ``MSE(decode(z), x) + kl_weight · KL(q(z|x) ‖ N(0, 1))``; its
   ``scaling_factor`` is then set to ``1 / std`` of the latents (the diffusers convention);
2. the denoiser (UNet, full training) and the CLIP text encoder with the DDPM ε-prediction loss,
   Min-SNR-γ weighted (:func:`min_snr_weight`), on the frozen VAE's latents (the posterior means: a
   short-trained VAE's posterior noise would otherwise be most of what the denoiser has to model);
   prompts are dropped to "" with probability ``cond_dropout`` so that classifier-free guidance
   works at sampling time; the saved weights are an exponential moving average (``ema_decay``).

The tokenizer is a CLIP tokenizer with one token per word of the world's grammar besides the
byte tokens (:func:`world_tokenizer`), so that the text encoder starts from words, not letters.
The scheduler and pipeline class are those of :mod:`pipelines.tiny`; the VAE, UNet and text encoder
are sized here (:func:`build_vae`, :func:`build_unet`, :func:`build_text_encoder`).

Only training prompts are rendered (held-out prompts stay unseen for the gate and GSB). The result
is a normal pipeline folder that ``load_adapter`` / ``DiffusionPipeline.from_pretrained`` load.

Dimension names: B images, C/H/W image, c/h/w latents, L tokens.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from zr_diffusion.io import atomic_write_json, write_dir_atomically
from zr_diffusion.synthetic.pretrain import corpus_scenes, render_items
from zr_diffusion.synthetic.world import WorldConfig


@dataclass
class GeneratorConfig:
    """Training the tiny generator from scratch."""

    family: str = "sd"  # the pipeline family (sd: the fastest tiny denoiser on a CPU, see the report)
    channels: int = 16  # denoiser width: block_out_channels (c, 2c, 2c, ...)
    levels: int = 3  # denoiser resolution levels (the first has no cross-attention)
    vae_channels: int = 16  # VAE width: block_out_channels (c, 2c), one 2x downsampling
    latent_channels: int = 4
    max_text_len: int = 16  # tokenizer length: a world prompt is at most 8 word tokens with BOS/EOS
    text_width: int = 64  # CLIP text encoder hidden size (2 layers)
    num_images: int = 2048  # world renders of the corpus prompts
    corpus: str = (
        "train"  # "train": the training prompts; "grammar": all but the held-out (pretrain.corpus_scenes)
    )
    defect_prob: float = 0.3  # per dimension, chance that a training render has a defect (world's: 0.6)
    batch_size: int = 16
    vae_steps: int = 300
    vae_lr: float = 3e-3
    kl_weight: float = 1e-4
    steps: int = 2400  # denoiser optimizer steps
    lr: float = 2e-3  # AdamW, cosine decay after warmup
    warmup_steps: int = 20
    cond_dropout: float = 0.1  # probability of training on the empty prompt (classifier-free guidance)
    train_text_encoder: bool = True  # the tiny CLIP text encoder is random too: train it with the denoiser
    snr_gamma: float = 5.0  # Min-SNR-γ loss weight min(SNR, γ) / SNR (Hang et al. 2023); 0: plain MSE
    ema_decay: float = 0.999  # the saved denoiser and text encoder are EMA weights (0: the last weights)

    def __post_init__(self) -> None:
        if self.family != "sd":
            raise ValueError(
                f"generator.family={self.family!r}: the from-scratch trainer is written for the UNet "
                f"family 'sd' (DDPM ε-prediction); the other families are supported by the recipes, "
                f"not by this trainer"
            )
        for name in (
            "channels",
            "levels",
            "vae_channels",
            "latent_channels",
            "max_text_len",
            "text_width",
            "num_images",
            "batch_size",
            "vae_steps",
            "steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"generator.{name} must be >= 1, got {getattr(self, name)}")
        if self.corpus not in ("train", "grammar"):
            raise ValueError(f"generator.corpus={self.corpus!r}: choose one of ['train', 'grammar']")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"generator.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if not 0 <= self.defect_prob <= 1:
            raise ValueError(f"generator.defect_prob must be a probability in [0, 1], got {self.defect_prob}")
        if self.snr_gamma < 0:
            raise ValueError(
                f"generator.snr_gamma must be >= 0 (0 turns the weighting off), got {self.snr_gamma}"
            )
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"generator.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.text_width % 16 != 0:
            raise ValueError(
                f"generator.text_width must be a multiple of 16 (4 heads), got {self.text_width}"
            )


def _cosine(optimizer, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def world_words() -> list[str]:
    """Every word of the world's prompt grammar (counts, colours, shapes and plurals, position phrases)."""
    from zr_diffusion.synthetic.shapes import SHAPES
    from zr_diffusion.synthetic.world import COLORS, COUNT_WORDS, COUNTS, POSITION_PHRASES, plural

    words = {COUNT_WORDS[n] for n in COUNTS} | set(COLORS)
    words |= {plural(shape, n) for shape in SHAPES for n in (1, 2)}
    words |= {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
    return sorted(words)


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges (most frequent adjacent pair first, ties by the pair's text) until every word is one
    token, in CLIP's convention: a word is its characters, the last one suffixed with ``</w>``."""
    seqs = [tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words))]
    merges: list[tuple[str, str]] = []
    while any(len(s) > 1 for s in seqs):
        pairs = Counter(p for s in seqs for p in zip(s, s[1:]))
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for s in seqs:
            out: list[str] = []
            for piece in s:
                if out and (out[-1], piece) == best:
                    out[-1] += piece
                else:
                    out.append(piece)
            merged.append(tuple(out))
        seqs = merged
    return merges


def world_tokenizer(max_len: int):
    """A CLIP tokenizer whose vocabulary is every byte (any text still tokenizes) plus one token per
    word of the world's grammar (:func:`world_words`), so that the from-scratch text encoder starts
    from words, not letters."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
    merges = learn_merges(world_words())
    tokens += list(dict.fromkeys(a + b for a, b in merges if a + b not in set(tokens)))
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=max_len)
    split = [w for w in world_words() if len(tok.tokenize(w)) != 1]
    if split:
        raise RuntimeError(f"world_tokenizer: the learned merges leave {split} in several tokens")
    return tok


def build_text_encoder(cfg: GeneratorConfig, vocab_size: int):
    """CLIPTextModel (2 layers, 4 heads, ``text_width`` wide) over ``vocab_size`` tokens."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=cfg.text_width,
            intermediate_size=2 * cfg.text_width,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=vocab_size,
            max_position_embeddings=cfg.max_text_len,
            hidden_act="gelu",
        )
    )


def build_vae(cfg: GeneratorConfig, size: int):
    """AutoencoderKL with one 2x downsampling and ``latent_channels`` channels (seeded by the caller)."""
    from diffusers import AutoencoderKL

    c = cfg.vae_channels
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(c, 2 * c),
        layers_per_block=1,
        latent_channels=cfg.latent_channels,
        norm_num_groups=4,
        sample_size=size,
    )


def build_unet(cfg: GeneratorConfig, size: int, text_encoder):
    """UNet2DConditionModel on the latents: ``levels`` resolutions, cross-attention below the first."""
    from diffusers import UNet2DConditionModel

    c, n = cfg.channels, cfg.levels
    return UNet2DConditionModel(
        sample_size=size // 2,
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        block_out_channels=tuple([c] + [2 * c] * (n - 1)),
        layers_per_block=1,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=text_encoder.config.hidden_size,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def _train_vae(
    vae, images: torch.Tensor, cfg: GeneratorConfig, gen: torch.Generator, desc: str
) -> list[dict]:
    from tqdm.auto import tqdm

    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr)
    schedule = _cosine(optimizer, min(cfg.warmup_steps, cfg.vae_steps), cfg.vae_steps)
    log = []
    for step in tqdm(range(cfg.vae_steps), desc=f"{desc} vae", dynamic_ncols=True, leave=False):
        idx = torch.randint(len(images), (cfg.batch_size,), generator=gen)
        x = images[idx] * 2 - 1  # [B, 3, H, W] in [-1, 1]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        mse = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / z[0].numel()  # per latent element
        loss = mse + cfg.kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        log.append({"step": step + 1, "loss": float(loss.detach()), "mse": float(mse.detach())})
    vae.requires_grad_(False).eval()
    return log


@torch.no_grad()
def _latent_means(vae, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Posterior mean of every image: ``[N, c, h, w]`` (unscaled)."""
    return torch.cat(
        [vae.encode(images[s : s + batch] * 2 - 1).latent_dist.mean for s in range(0, len(images), batch)]
    )


@torch.no_grad()
def _recon_mse(vae, images: torch.Tensor) -> float:
    x = images * 2 - 1
    return float(F.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1), x))


def min_snr_weight(sched, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weight of the ε-prediction loss, ``min(SNR_t, γ) / SNR_t`` with ``SNR_t = ᾱ_t / (1 − ᾱ_t)``
    (Hang et al. 2023, for ε-prediction); ones when ``gamma`` is 0. ``t [B]`` → ``[B]``."""
    if gamma == 0:
        return torch.ones(t.shape)
    abar = sched.alphas_cumprod[t]
    snr = abar / (1 - abar)
    return snr.clamp(max=gamma) / snr


def _token_ids(pipe, prompts: list[str]) -> torch.Tensor:
    return pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids  # [B, L], as StableDiffusionPipeline.encode_prompt builds them


def _training_renders(world: WorldConfig, images_jsonl: str | Path, cfg: GeneratorConfig):
    """``num_images`` renders of the corpus prompts with the generator's own defect rate."""
    scenes = corpus_scenes(images_jsonl, cfg.corpus)
    items = render_items(scenes, replace(world, defect_prob=cfg.defect_prob), cfg.num_images, stream=2)
    images = torch.from_numpy(np.stack([it.image.transpose(2, 0, 1) for it in items])).float()  # [N, 3, H, W]
    return images, [it.prompt for it in items], len(scenes)


def _train_denoiser(pipe, latents: torch.Tensor, ids: torch.Tensor, cfg: GeneratorConfig, gen) -> list[dict]:
    """DDPM ε-prediction on ``latents [N, c, h, w]`` (already scaled) with token ids ``[N, L]``; the
    weights left in the modules are the EMA weights (``ema_decay`` > 0)."""
    from tqdm.auto import tqdm

    unet, text_encoder, sched = pipe.unet, pipe.text_encoder, pipe.scheduler
    empty = _token_ids(pipe, [""])  # [1, L]
    unet.requires_grad_(True).train()
    params = list(unet.parameters())
    text_encoder.requires_grad_(cfg.train_text_encoder).train(cfg.train_text_encoder)
    if cfg.train_text_encoder:
        params += list(text_encoder.parameters())
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    schedule = _cosine(optimizer, cfg.warmup_steps, cfg.steps)
    n_train = sched.config.num_train_timesteps
    log = []
    bar = tqdm(range(cfg.steps), desc="generator denoiser", dynamic_ncols=True, leave=False)
    for step in bar:
        idx = torch.randint(len(latents), (cfg.batch_size,), generator=gen)
        drop = torch.rand(cfg.batch_size, generator=gen) < cfg.cond_dropout
        batch_ids = torch.where(drop[:, None], empty, ids[idx])  # [B, L]
        with torch.set_grad_enabled(cfg.train_text_encoder):
            embeds = text_encoder(batch_ids)[0]  # [B, L, D]
        x0 = latents[idx]
        t = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = unet(sched.add_noise(x0, noise, t), t, encoder_hidden_states=embeds).sample
        per_image = (pred - noise).pow(2).mean(dim=(1, 2, 3))  # [B]
        loss = (min_snr_weight(sched, t, cfg.snr_gamma) * per_image).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))  # EMA warm-up: early weights fade fast
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        log.append({"step": step + 1, "loss": float(loss.detach())})
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return log


def train_generator(
    out_dir: str | Path, world: WorldConfig, images_jsonl: str | Path, cfg: GeneratorConfig, seed: int = 0
) -> dict:
    """Train the tiny pipeline from scratch; writes ``out_dir/pipeline`` and ``out_dir/metrics.json``."""
    from zr_diffusion.pipelines.tiny import TinySpec, build_tiny_t2i

    out = Path(out_dir)
    tic, cpu = time.perf_counter(), time.process_time()
    images, prompts, n_prompts = _training_renders(world, images_jsonl, cfg)
    spec = TinySpec(sample_size=world.image_size, channels=8, max_text_len=cfg.max_text_len)
    pipe = build_tiny_t2i(cfg.family, seed=seed, spec=spec)  # the pipeline class and its scheduler
    torch.manual_seed(seed)
    tokenizer = world_tokenizer(cfg.max_text_len)
    text_encoder = build_text_encoder(cfg, len(tokenizer))
    vae, unet = build_vae(cfg, world.image_size), build_unet(cfg, world.image_size, text_encoder)
    pipe.register_modules(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, unet=unet)
    gen = torch.Generator().manual_seed(seed)

    vae_log = _train_vae(pipe.vae, images, cfg, gen, "generator")
    mean = _latent_means(pipe.vae, images)
    scale = float(1.0 / mean.std())
    pipe.vae.register_to_config(scaling_factor=scale)
    vae_seconds = time.perf_counter() - tic

    log = _train_denoiser(pipe, mean * scale, _token_ids(pipe, prompts), cfg, gen)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        module.requires_grad_(False).eval()

    def write(tmp: Path) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)

    write_dir_atomically(out / "pipeline", write)
    metrics = {
        "family": cfg.family,
        "train_images": len(images),
        "train_prompts": n_prompts,
        "vae": vae_log,
        "vae_recon_mse": _recon_mse(pipe.vae, images[:256]),
        "latent_scaling_factor": scale,
        "train": log,
        "denoiser_params": sum(p.numel() for p in pipe.unet.parameters()),
        "text_encoder_params": sum(p.numel() for p in pipe.text_encoder.parameters()),
        "vae_seconds": vae_seconds,
        "seconds": time.perf_counter() - tic,
        "cpu_seconds": time.process_time() - cpu,  # all threads together
        "threads": torch.get_num_threads(),
        "pipeline": str(out / "pipeline"),
    }
    atomic_write_json(out / "metrics.json", metrics)
    return metrics


def merge_lora(pipeline: str | Path, lora: str | Path, out_dir: str | Path) -> Path:
    """Save ``pipeline`` with the LoRA at ``lora`` fused into its denoiser as a new pipeline folder
    (so that a second LoRA can be trained on top of the first, as the paper tunes its SFT model)."""
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.export import fuse_loras

    adapter = load_adapter(pipeline)
    fuse_loras(adapter, [lora])
    return write_dir_atomically(
        out_dir, lambda tmp: adapter.pipe.save_pretrained(tmp, safe_serialization=True)
    )


__all__ = ["GeneratorConfig", "merge_lora", "train_generator"]
