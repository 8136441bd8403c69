"""Where the differentiable sampler builds graphs, on a tiny SD pipeline.

A forward hook on the denoiser records ``torch.is_grad_enabled()`` for every call, in call order,
so each test can say exactly which steps ran with a graph.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.memory import SavedTensorMeter
from zr_diffusion.pipelines.sampler import SamplerConfig, sample
from zr_diffusion.pipelines.tiny import make_tiny_t2i

PROMPTS = ["a red cube", "a blue sky"]
SIZE = 32


def _config(num_steps: int, **kw) -> SamplerConfig:
    return SamplerConfig(num_steps=num_steps, guidance_scale=7.5, height=SIZE, width=SIZE, **kw)


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory):
    return make_tiny_t2i(tmp_path_factory.mktemp("sd"), "sd", sample_size=SIZE)


@pytest.fixture
def adapter(sd_dir):
    adapter = load_adapter(sd_dir)
    adapter.add_lora(rank=4)
    for p in adapter.lora_parameters():  # non-zero LoRA B, so every LoRA tensor gets a gradient
        torch.nn.init.normal_(p, std=0.02)
    return adapter


@pytest.fixture
def grad_flags(adapter):
    """torch.is_grad_enabled() at each denoiser call, in call order."""
    flags: list[bool] = []
    handle = adapter.denoiser.register_forward_hook(
        lambda m, args, out: flags.append(torch.is_grad_enabled())
    )
    yield flags
    handle.remove()


def _lora_grads(adapter, images: torch.Tensor) -> list[torch.Tensor]:
    for p in adapter.lora_parameters():
        p.grad = None
    images.mean().backward()
    return [p.grad for p in adapter.lora_parameters()]


def test_draft_k1_builds_a_graph_only_in_the_last_step(adapter, grad_flags):
    out = sample(adapter, PROMPTS, _config(5), seed=0)
    assert grad_flags == [False, False, False, False, True]
    assert out.info.grad_steps == [4] and out.info.scored == "final"
    assert out.images.shape == (2, 3, SIZE, SIZE) and out.images.requires_grad
    grads = _lora_grads(adapter, out.images)
    assert all(g is not None and g.abs().sum() > 0 for g in grads)


def test_draft_k3_builds_graphs_in_the_last_three_steps(adapter, grad_flags):
    out = sample(adapter, PROMPTS, _config(5, draft_k=3), seed=0)
    assert grad_flags == [False, False, True, True, True]
    assert out.info.grad_steps == [2, 3, 4]


def test_no_grad_sampling_builds_no_graph(adapter, grad_flags):
    out = sample(adapter, PROMPTS, _config(4), seed=0, grad=False)
    assert grad_flags == [False] * 4 and not out.images.requires_grad


def test_refl_one_grad_step_in_its_window_scores_x0_prediction(adapter, grad_flags):
    T, window = 6, (2, 4)
    stops = set()
    for seed in range(5):
        grad_flags.clear()
        out = sample(adapter, PROMPTS, _config(T, mode="refl", refl_window=window), seed=seed)
        s = out.info.stop_step
        assert window[0] <= s <= window[1]
        assert grad_flags == [False] * s + [True], "no-grad to s, one step with gradient, nothing after"
        assert out.info.grad_steps == [s] and out.info.scored == "pred_x0"
        stops.add(s)
        # Recompute without a graph: same initial latents (drawn first), no-grad to s, x0-prediction at s.
        with torch.no_grad():
            generator = torch.Generator().manual_seed(seed)
            cond = adapter.encode_prompts(PROMPTS, guidance_scale=7.5)
            x = adapter.initial_latents(len(PROMPTS), SIZE, SIZE, generator)
            for i in range(s):
                x = adapter.denoise_step(x, i, cond)
            torch.testing.assert_close(
                out.latents.detach(), adapter.predict_x0(x, s, cond), atol=1e-5, rtol=0
            )
    assert len(stops) > 1, f"ReFL always stopped at {stops}"


def test_refl_default_window_is_the_last_quarter():
    assert _config(40, mode="refl").resolved_refl_window() == (30, 39)  # ReFL's T=40, s in [30, 39]


def test_refl_at_the_last_step_still_scores_x0_prediction(adapter, grad_flags):
    out = sample(adapter, PROMPTS, _config(3, mode="refl", refl_window=(2, 2)), seed=0)
    assert grad_flags == [False, False, True]
    assert out.info.scored == "pred_x0" and out.info.stop_step == 2


def test_draft_lv_adds_renoised_copies_of_the_last_step(adapter, grad_flags):
    n = 2
    out = sample(adapter, PROMPTS, _config(4, draft_lv=n), seed=0)
    assert grad_flags == [False, False, False, True] + [True] * n
    assert out.images.shape == (2 * (1 + n), 3, SIZE, SIZE)
    assert out.prompts == PROMPTS * (1 + n) and out.info.lv_copies == n
    main, copies = out.latents[:2].detach(), out.latents[2:].detach()
    assert not torch.allclose(copies[:2], copies[2:]), "each copy needs its own noise"
    # A copy denoises the final sample re-noised to the last step's (low) noise level: close, not equal.
    for copy in copies.split(2):
        assert 0 < (copy - main).abs().max() < (main.abs().max())
    assert all(g.abs().sum() > 0 for g in _lora_grads(adapter, out.images[2:]))


def test_window_mode_gradient_reaches_every_window_step(adapter):
    T, window = 6, (1, 3)
    reached: list[int] = []
    calls: list[tuple[int, bool]] = []

    def hook(module, args, out):
        t = int(args[1][0])  # the UNet gets one timestep per row, all equal while sampling
        assert (args[1] == t).all()
        calls.append((t, torch.is_grad_enabled()))
        if out[0].requires_grad:
            out[0].register_hook(lambda g: reached.append(t))

    handle = adapter.denoiser.register_forward_hook(hook)
    config = _config(T, mode="window", window=window, denoiser_checkpoint="none")
    out = sample(adapter, PROMPTS, config, seed=0)
    handle.remove()
    timesteps = [int(t) for t in adapter.timesteps]
    assert [g for _, g in calls] == [False, True, True, True], "steps after the window are not run"
    assert out.info.grad_steps == [1, 2, 3] and out.info.scored == "pred_x0" and out.info.stop_step == 3
    out.images.mean().backward()
    assert sorted(reached) == sorted(timesteps[1:4]), (
        "backward reaches the denoiser call of every window step"
    )


def test_window_ending_at_last_step_is_draft_k(adapter):
    a = sample(adapter, PROMPTS, _config(5, mode="window", window=(3, 4)), seed=1)
    b = sample(adapter, PROMPTS, _config(5, draft_k=2), seed=1)
    assert a.info.grad_steps == b.info.grad_steps == [3, 4] and a.info.scored == "final"
    torch.testing.assert_close(a.images, b.images)


def test_checkpointing_gives_the_same_gradients(adapter):
    kw = {"draft_k": 2}
    plain = _lora_grads(
        adapter,
        sample(
            adapter, PROMPTS, _config(4, denoiser_checkpoint="none", checkpoint_decoder=False, **kw), seed=0
        ).images,
    )
    ckpt = _lora_grads(adapter, sample(adapter, PROMPTS, _config(4, **kw), seed=0).images)
    for a, b in zip(plain, ckpt):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("how", ["blocks", "none"])
def test_denoiser_checkpoint_options_give_the_same_gradients(adapter, how):
    """Per-block and no checkpointing against today's whole-call checkpoint, DRaFT-2 (two window steps)."""
    base = _lora_grads(adapter, sample(adapter, PROMPTS, _config(4, draft_k=2), seed=0).images)
    other = sample(adapter, PROMPTS, _config(4, draft_k=2, denoiser_checkpoint=how), seed=0)
    for a, b in zip(base, _lora_grads(adapter, other.images)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("family", ["flux", "zimage"])
def test_block_checkpointing_of_transformer_families_gives_the_same_gradients(tmp_path, family):
    flow = load_adapter(make_tiny_t2i(tmp_path, family, sample_size=SIZE))
    flow.add_lora(rank=4)
    for p in flow.lora_parameters():
        torch.nn.init.normal_(p, std=0.02)
    config = SamplerConfig(num_steps=3, guidance_scale=3.5, height=SIZE, width=SIZE, draft_k=2)
    base = _lora_grads(flow, sample(flow, PROMPTS, config, seed=0).images)
    assert all(g is not None for g in base) and sum(g.abs().sum() for g in base) > 0
    blocks = sample(flow, PROMPTS, replace(config, denoiser_checkpoint="blocks"), seed=0)
    assert flow.denoiser.is_gradient_checkpointing
    for a, b in zip(base, _lora_grads(flow, blocks.images)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_block_checkpointing_acts_in_eval_mode_inside_the_window_only(adapter):
    """diffusers checks ``torch.is_grad_enabled()``, not ``self.training``: blocks are checkpointed in the
    eval-mode denoiser during the grad step, never in the no-grad prefix, and the graph keeps less."""
    calls: list[bool] = []
    blocks = [m for m in adapter.denoiser.modules() if hasattr(m, "gradient_checkpointing")]
    handles = [
        b.register_forward_pre_hook(lambda m, a: calls.append(m.gradient_checkpointing)) for b in blocks
    ]
    assert not adapter.denoiser.training
    sample(adapter, PROMPTS, _config(3, denoiser_checkpoint="blocks"), seed=0)
    for h in handles:
        h.remove()
    assert adapter.denoiser.is_gradient_checkpointing and all(calls) and calls
    kept = {how: _saved_bytes(adapter, _config(3, denoiser_checkpoint=how)) for how in ("none", "blocks")}
    assert 0 < kept["blocks"] < kept["none"] / 2
    sample(adapter, PROMPTS, _config(3, denoiser_checkpoint="call"), seed=0)
    assert not adapter.denoiser.is_gradient_checkpointing, "another setting turns it off again"


@pytest.mark.parametrize("ckpt", [True, False])
def test_decoding_one_image_at_a_time_gives_the_same_images_and_gradients(adapter, ckpt):
    batch = sample(adapter, PROMPTS, _config(3, checkpoint_decoder=ckpt), seed=0)
    single = sample(adapter, PROMPTS, _config(3, checkpoint_decoder=ckpt, decode_per_image=True), seed=0)
    torch.testing.assert_close(batch.images, single.images, atol=1e-6, rtol=1e-5)
    for a, b in zip(_lora_grads(adapter, batch.images), _lora_grads(adapter, single.images)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_prefix_dtype_autocasts_the_no_grad_steps_only(adapter):
    autocast: list[tuple[bool, bool]] = []  # (grad enabled, autocast enabled) per denoiser call
    handle = adapter.denoiser.register_forward_hook(
        lambda m, a, o: autocast.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu")))
    )
    fp32 = sample(adapter, PROMPTS, _config(4), seed=0)
    half = sample(adapter, PROMPTS, _config(4, prefix_dtype="bfloat16"), seed=0)
    handle.remove()
    assert autocast == [(False, False)] * 3 + [(True, False)] + [(False, True)] * 3 + [(True, False)]
    assert half.images.dtype == torch.float32
    diff = (half.images - fp32.images).abs().max()
    assert 0 < diff < 0.05, "bfloat16 steps change the sample a little, not a lot"


def _saved_bytes(adapter, config: SamplerConfig) -> int:
    params = [
        p for m in adapter.pipe.components.values() if isinstance(m, torch.nn.Module) for p in m.parameters()
    ]
    with SavedTensorMeter(exclude=params) as meter:
        sample(adapter, PROMPTS, config, seed=0)
    return meter.bytes


def test_graph_memory_does_not_grow_with_num_steps(adapter):
    k1 = [_saved_bytes(adapter, _config(T)) for T in (3, 8)]
    assert k1[0] == k1[1] > 0
    full = [
        _saved_bytes(adapter, _config(T, mode="window", window=(0, T - 1), denoiser_checkpoint="none"))
        for T in (3, 8)
    ]
    assert full[1] > 2 * full[0], "plain full backprop grows with T (the meter must see it)"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "dpo"}, "mode must be one of"),
        ({"denoiser_checkpoint": "layer"}, "denoiser_checkpoint must be one of"),
        ({"prefix_dtype": "float8"}, "prefix_dtype must be one of"),
        ({"draft_k": 0}, "draft_k must be in 1..num_steps=4"),
        ({"draft_k": 5}, "draft_k must be in 1..num_steps=4"),
        ({"mode": "refl", "draft_lv": 1}, "draft_lv=1 needs mode='draft'"),
        ({"mode": "window"}, "needs window=\\(start, end\\)"),
        ({"window": (0, 1)}, "window=\\(0, 1\\) needs mode='window'"),
        ({"refl_window": (0, 1)}, "refl_window=\\(0, 1\\) needs mode='refl'"),
        ({"mode": "window", "window": (2, 4)}, "window=\\(2, 4\\) must satisfy"),
        ({"mode": "refl", "refl_window": (3, 1)}, "refl_window=\\(3, 1\\) must satisfy"),
    ],
)
def test_config_errors_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _config(4, **kwargs)


def test_seed_and_generator_are_exclusive(adapter):
    with pytest.raises(ValueError, match="either generator or seed"):
        sample(adapter, PROMPTS, _config(2), generator=torch.Generator(), seed=0)
