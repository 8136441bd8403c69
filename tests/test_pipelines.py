"""Adapters on tiny pipelines of the real diffusers classes, built offline (one per family).

Per family: the adapter's sampling reproduces the pipeline's own ``__call__``; a reward-gradient step
moves every LoRA weight and no base weight; a saved LoRA loads into a fresh pipeline with
``pipe.load_lora_weights`` and reproduces the adapter's output; bad LoRA folders fail clearly.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from diffusers import DiffusionPipeline

from zr_diffusion.pipelines.adapters import ADAPTERS, detect_family, load_adapter
from zr_diffusion.pipelines.base import LORA_FAMILY_FILE
from zr_diffusion.pipelines.sampler import SamplerConfig, sample
from zr_diffusion.pipelines.sd import SDAdapter
from zr_diffusion.pipelines.tiny import make_tiny_t2i

FAMILIES = ("sd", "sdxl", "flux", "zimage")
GUIDANCE = {"sd": 7.5, "sdxl": 5.0, "flux": 3.5, "zimage": 4.0}  # guidance on in every family's convention
PROMPTS = ["a red cube", "a blue sky"]
SIZE, STEPS = 32, 3


def _config(family: str, **kw) -> SamplerConfig:
    return SamplerConfig(num_steps=STEPS, guidance_scale=GUIDANCE[family], height=SIZE, width=SIZE, **kw)


def _pipe_images(
    pipe: DiffusionPipeline, family: str, prompts: list[str], seed: int, **extra
) -> torch.Tensor:
    """Images from the pipeline's own __call__, [B, 3, H, W] in [0, 1]."""
    with torch.no_grad():
        return pipe(
            prompts,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            guidance_scale=GUIDANCE[family],
            output_type="pt",
            generator=torch.Generator().manual_seed(seed),
            **extra,
        ).images


def _seq_len_kwargs(adapter) -> dict:
    return (
        {"max_sequence_length": adapter.max_sequence_length} if adapter.family in ("flux", "zimage") else {}
    )


def _brightness_reward(images: torch.Tensor) -> torch.Tensor:
    """Differentiable stand-in for the VLM reward: mean brightness per image. [B, 3, H, W] -> [B]."""
    return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {f: make_tiny_t2i(root / f, f, seed=0, sample_size=SIZE) for f in FAMILIES}


def _held_out_brightness(adapter, family: str) -> float:
    """Mean brightness of images from a seed the training steps never used."""
    with torch.no_grad():
        return float(
            _brightness_reward(sample(adapter, PROMPTS, _config(family), seed=9, grad=False).images).mean()
        )


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """Per family: an adapter after two reward-gradient steps, its base weights before, its saved LoRA,
    and the mean brightness of held-out images (seed 9) before and after the two steps."""
    out = {}
    for family in FAMILIES:
        adapter = load_adapter(tiny_dirs[family])
        frozen_before = {
            (name, pname): p.detach().clone()
            for name, module in adapter.pipe.components.items()
            if isinstance(module, torch.nn.Module)
            for pname, p in module.named_parameters()
        }
        adapter.add_lora(rank=4, alpha=8.0)  # alpha != rank: the saved metadata must carry the scale
        lora_before = [p.detach().clone() for p in adapter.lora_parameters()]
        brightness = [_held_out_brightness(adapter, family)]
        opt = torch.optim.Adam(adapter.lora_parameters(), lr=1e-2)
        # Two steps: LoRA B starts at zero, so A only receives gradient from the second step on.
        for step in range(2):
            images = sample(adapter, PROMPTS, _config(family), seed=step).images
            loss = -_brightness_reward(images).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        brightness.append(_held_out_brightness(adapter, family))
        lora_dir = adapter.save_lora(tmp_path_factory.mktemp(f"lora_{family}"))
        out[family] = (adapter, frozen_before, lora_before, lora_dir, brightness)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_detects_family(tiny_dirs, family):
    assert detect_family(tiny_dirs[family]) == family
    adapter = load_adapter(tiny_dirs[family])
    assert isinstance(adapter, ADAPTERS[family]) and adapter.family == family
    assert not any(p.requires_grad for p in adapter.denoiser.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_matches_pipeline_call(tiny_dirs, family):
    adapter = load_adapter(tiny_dirs[family])
    out = sample(adapter, PROMPTS, _config(family), seed=3, grad=False)
    assert out.images.shape == (2, 3, SIZE, SIZE)
    assert out.images.min() >= 0 and out.images.max() <= 1
    expected = _pipe_images(adapter.pipe, family, PROMPTS, seed=3, **_seq_len_kwargs(adapter))
    torch.testing.assert_close(out.images, expected, atol=1e-5, rtol=0)


def test_sd_v_prediction_matches_pipeline_call(tmp_path):
    adapter = load_adapter(make_tiny_t2i(tmp_path, "sd", prediction_type="v_prediction"))
    assert adapter.scheduler.config.prediction_type == "v_prediction"
    out = sample(adapter, PROMPTS, _config("sd"), seed=1, grad=False)
    torch.testing.assert_close(
        out.images, _pipe_images(adapter.pipe, "sd", PROMPTS, seed=1), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_reward_step_moves_only_lora(trained, family):
    adapter, frozen_before, lora_before, _, _ = trained[family]
    lora_now = adapter.lora_parameters()
    assert lora_now and all(p.dtype == torch.float32 for p in lora_now)
    unchanged = [i for i, (a, b) in enumerate(zip(lora_before, lora_now)) if torch.equal(a, b)]
    assert not unchanged, f"{len(unchanged)} of {len(lora_now)} LoRA tensors did not move"
    for name, module in adapter.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for pname, p in module.named_parameters():
                if "lora_" not in pname:
                    before = frozen_before[(name, pname.replace(".base_layer", ""))]  # peft wraps targets
                    assert torch.equal(p, before), f"base weight {name}.{pname} moved"


@pytest.mark.parametrize("family", FAMILIES)
def test_brightness_reward_steps_raise_brightness(trained, family):
    """Two steps of −mean brightness make held-out images brighter (a flipped sign makes them darker)."""
    before, after = trained[family][4]
    assert after > before + 1e-4, f"{family}: brightness {before:.5f} -> {after:.5f}"


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_lora_loads_into_fresh_pipeline(trained, tiny_dirs, family):
    adapter, _, _, lora_dir, _ = trained[family]
    assert json.loads((lora_dir / LORA_FAMILY_FILE).read_text())["family"] == family
    fresh = DiffusionPipeline.from_pretrained(tiny_dirs[family])
    kw = _seq_len_kwargs(adapter)
    base = _pipe_images(fresh, family, PROMPTS[:1], seed=5, **kw)
    fresh.load_lora_weights(lora_dir)
    tuned = _pipe_images(fresh, family, PROMPTS[:1], seed=5, **kw)
    assert (tuned - base).abs().max() > 1e-4, "loading the LoRA did not change the output"
    with torch.no_grad():
        mine = sample(adapter, PROMPTS[:1], _config(family), seed=5, grad=False).images
    torch.testing.assert_close(tuned, mine, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_load_lora_reproduces_output(trained, tiny_dirs, family):
    adapter, _, _, lora_dir, _ = trained[family]
    fresh = load_adapter(tiny_dirs[family])
    fresh.load_lora(lora_dir)
    with torch.no_grad():
        expected = sample(adapter, PROMPTS[:1], _config(family), seed=6, grad=False).images
        got = sample(fresh, PROMPTS[:1], _config(family), seed=6, grad=False).images
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_load_lora_errors(trained, tiny_dirs, tmp_path):
    sd = load_adapter(tiny_dirs["sd"])
    with pytest.raises(FileNotFoundError, match="no LoRA weights"):
        sd.load_lora(tmp_path / "missing")
    flux_lora = trained["flux"][3]
    with pytest.raises(ValueError, match="belongs to family 'flux'.*this adapter is 'sd'"):
        sd.load_lora(flux_lora)
    # Without the family record the keys decide: transformer.* keys are not an SD UNet LoRA.
    unrecorded = tmp_path / "unrecorded"
    shutil.copytree(flux_lora, unrecorded)
    (unrecorded / LORA_FAMILY_FILE).unlink()
    with pytest.raises(ValueError, match="does not look like a 'sd' LoRA"):
        sd.load_lora(unrecorded)
    zimage = load_adapter(tiny_dirs["zimage"])
    with pytest.raises(ValueError, match="does not look like a 'zimage' LoRA"):
        zimage.load_lora(unrecorded)


def test_wrong_pipeline_and_unknown_class_errors(tiny_dirs, tmp_path):
    with pytest.raises(ValueError, match="needs one of \\['StableDiffusionPipeline'\\], got FluxPipeline"):
        load_adapter(tiny_dirs["flux"], family="sd")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="'KandinskyPipeline'.*not supported; supported:.*ZImagePipeline"):
        detect_family(tmp_path)
    with pytest.raises(ValueError, match="unknown family 'sd3'"):
        load_adapter(tiny_dirs["sd"], family="sd3")


def test_add_lora_rejects_unknown_targets(tiny_dirs):
    adapter = SDAdapter.from_pretrained(tiny_dirs["sd"])
    with pytest.raises(ValueError, match="LoRA targets \\['qkv_nope'\\] match no module"):
        adapter.add_lora(rank=2, targets=("to_q", "qkv_nope"))


def test_flux_rejects_negative_prompts(tiny_dirs):
    adapter = load_adapter(tiny_dirs["flux"])
    with pytest.raises(ValueError, match="guidance embedding"):
        adapter.encode_prompts(PROMPTS, negative_prompts=["", ""])


def test_sd_shipped_with_another_scheduler_samples_ddim_without_clipping(tmp_path):
    """DDIMScheduler.from_config fills clip_sample=True when the source config lacks the key (a
    DPMSolverMultistepScheduler config does); clamping x0 to [-1, 1] at every step would cut the
    latents' range and zero their gradient, so the converted scheduler must not clip."""
    from diffusers import DPMSolverMultistepScheduler

    from zr_diffusion.pipelines.tiny import build_tiny_t2i

    pipe = build_tiny_t2i("sd")
    pipe.scheduler = DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    assert "clip_sample" not in pipe.scheduler.config
    pipe.save_pretrained(tmp_path, safe_serialization=True)
    adapter = load_adapter(tmp_path)
    assert type(adapter.scheduler).__name__ == "DDIMScheduler"
    assert adapter.scheduler.config.clip_sample is False
    adapter.set_timesteps(STEPS, SIZE, SIZE)
    latents = torch.full((1, 4, 16, 16), 3.0, requires_grad=True)  # x0 well outside [-1, 1]
    x0 = adapter.step(torch.zeros(1, 4, 16, 16), 0, latents).pred_x0  # epsilon 0: x0 = x_t / √ᾱ_t
    a_t = adapter.scheduler.alphas_cumprod[int(adapter.timesteps[0])]
    torch.testing.assert_close(x0, latents.detach() / a_t.sqrt())
    x0.sum().backward()
    torch.testing.assert_close(latents.grad, torch.full_like(latents, 1 / float(a_t.sqrt())))


@pytest.mark.parametrize("family", FAMILIES)
def test_model_output_at_takes_one_timestep_per_sample(tiny_dirs, family):
    """With guidance on, sample b at timesteps[b] equals a one-sample call at that sampling step."""
    adapter = load_adapter(tiny_dirs[family])
    x = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    cond = adapter.encode_prompts(PROMPTS, guidance_scale=GUIDANCE[family])
    adapter.set_timesteps(STEPS, SIZE, SIZE)
    steps = (0, STEPS - 1)  # sample 0 at the first step, sample 1 at the last
    with torch.no_grad():
        batched = adapter.model_output_at(x, adapter.timesteps[list(steps)], cond)  # [2, C, h, w]
        for b, i in enumerate(steps):
            one = adapter.encode_prompts(PROMPTS[b : b + 1], guidance_scale=GUIDANCE[family])
            single = adapter.model_output(x[b : b + 1], i, one)
            torch.testing.assert_close(batched[b : b + 1], single, rtol=1e-4, atol=1e-5)
        assert (batched[0] - adapter.model_output(x, steps[1], cond)[0]).abs().max() > 1e-3  # t matters
    with pytest.raises(ValueError, match=r"timesteps must be \[B\] = \[2\]"):
        adapter.model_output_at(x, adapter.timesteps[:1], cond)


def _overflowing_vae_sdxl(path, force_upcast: bool):
    """A tiny SDXL whose VAE's first convolutions reach activations above float16's 65504 (as the
    real SDXL VAE does in float16), finite in float32."""
    from zr_diffusion.pipelines.tiny import build_tiny_t2i

    pipe = build_tiny_t2i("sdxl")
    with torch.no_grad():
        for conv in (pipe.vae.decoder.conv_in, pipe.vae.encoder.conv_in):
            conv.weight.mul_(1e5)  # |w| <= 2e4: representable in float16
            conv.bias.mul_(1e5)
    pipe.vae.register_to_config(force_upcast=force_upcast)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_vae_force_upcast_decodes_and_encodes_in_float32(tmp_path):
    """As StableDiffusionXLPipeline does: a float16 VAE with force_upcast runs in float32, also
    under float16 autocast; one without force_upcast stays in float16 (and overflows here)."""
    from zr_diffusion.pipelines.sft import encode_images

    gen = torch.Generator().manual_seed(0)
    z, images = torch.randn(2, 4, 16, 16, generator=gen), torch.rand(2, 3, SIZE, SIZE, generator=gen)
    path = _overflowing_vae_sdxl(tmp_path / "upcast", force_upcast=True)
    reference = load_adapter(path)  # float32
    with torch.no_grad():
        expected = reference.decode(z)
        assert expected.isfinite().all() and expected.std() > 0.01
        with torch.autocast("cpu", dtype=torch.float16):
            torch.testing.assert_close(reference.decode(z), expected, atol=1e-5, rtol=0)
            assert encode_images(reference, images, torch.Generator().manual_seed(1)).isfinite().all()
        half = load_adapter(path, dtype=torch.float16)
        assert half.dtype == torch.float16  # the denoiser keeps the requested dtype
        torch.testing.assert_close(half.decode(z), expected, atol=2e-2, rtol=0)  # fp16-rounded weights
        assert encode_images(half, images, torch.Generator().manual_seed(1)).isfinite().all()

        kept = load_adapter(_overflowing_vae_sdxl(tmp_path / "kept", force_upcast=False), dtype=torch.float16)
        assert not kept.decode(z).isfinite().all()


def _tiny_flux_schnell(path):
    """A tiny Flux.1-schnell: the transformer has no guidance embedding (timestep-distilled, no CFG)."""
    from diffusers import FluxTransformer2DModel

    from zr_diffusion.pipelines.tiny import build_tiny_t2i

    pipe = build_tiny_t2i("flux")
    torch.manual_seed(0)
    config = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    pipe.register_modules(transformer=FluxTransformer2DModel(**{**config, "guidance_embeds": False}))
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def test_guidance_defaults_per_family(tiny_dirs, tmp_path):
    """No guidance_scale given: what each family's own pipeline does without one (SD 7.5, SDXL 5.0,
    Flux.1-dev 3.5; Flux.1-schnell has no guidance embedding and no CFG: 0), and for Z-Image a clear
    error, since Z-Image-Turbo samples with 0 and the base model with CFG."""
    unset = SamplerConfig(num_steps=STEPS, height=SIZE, width=SIZE)
    assert unset.guidance_scale is None
    adapters = {f: load_adapter(tiny_dirs[f]) for f in ("sd", "sdxl", "flux")}
    adapters["schnell"] = load_adapter(_tiny_flux_schnell(tmp_path / "schnell"))
    for name, default in {"sd": 7.5, "sdxl": 5.0, "flux": 3.5, "schnell": 0.0}.items():
        adapter = adapters[name]
        assert adapter.encode_prompts(PROMPTS).guidance_scale == default
        with torch.no_grad():  # the pipeline's __call__ with its own default guidance
            expected = adapter.pipe(
                PROMPTS,
                num_inference_steps=STEPS,
                height=SIZE,
                width=SIZE,
                output_type="pt",
                generator=torch.Generator().manual_seed(0),
                **_seq_len_kwargs(adapter),
            ).images
        got = sample(adapter, PROMPTS, unset, seed=0, grad=False).images
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="no guidance embedding; guidance_scale must be 0, got 3.5"):
        adapters["schnell"].encode_prompts(PROMPTS, guidance_scale=3.5)

    zimage = load_adapter(tiny_dirs["zimage"])
    with pytest.raises(ValueError, match="Z-Image-Turbo .* 0.*base Z-Image .*CFG"):
        sample(zimage, PROMPTS, unset, seed=0, grad=False)
