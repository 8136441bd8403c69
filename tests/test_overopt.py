"""The over-optimisation sweep's measures (zr_diffusion/synthetic/overopt.py): hand-computed values."""

import pytest
import torch

from zr_diffusion.pipelines.adapters import load_adapter
from zr_diffusion.pipelines.sampler import SamplerConfig
from zr_diffusion.pipelines.tiny import make_tiny_t2i
from zr_diffusion.synthetic.overopt import (
    SweepSettings,
    build_probe,
    gold_peak,
    mean_points,
    peak_table,
    prediction_deviation,
    squared_deviation,
)


def _point(step, gold, proxy=0.0, deviation=0.0):
    return {
        "step": step,
        "gold": {"aggregate": gold, "alignment": gold + 1},
        "proxy": proxy,
        "deviation": deviation,
    }


def test_gold_peak_finds_the_maximum_the_earliest_on_ties_and_the_end():
    # gold 3.0, 3.4, 3.6, 3.6, 3.1 at steps 0..48: peaks first at step 24, ends at 3.1
    points = [
        _point(s, g, proxy=s / 10, deviation=s / 100)
        for s, g in zip((0, 12, 24, 36, 48), (3.0, 3.4, 3.6, 3.6, 3.1))
    ]
    got = gold_peak(list(reversed(points)))  # the order given does not matter
    assert got == {
        "peak_step": 24,
        "peak_deviation": 0.24,
        "peak_gold": 3.6,
        "start_gold": 3.0,
        "end_step": 48,
        "end_gold": 3.1,
        "end_proxy": 4.8,
    }
    monotone = gold_peak([_point(0, 1.0), _point(1, 2.0)])
    assert (monotone["peak_step"], monotone["end_gold"]) == (1, 2.0)  # no turn-down: peak at the end
    with pytest.raises(ValueError, match="at least one"):
        gold_peak([])


def test_mean_points_average_each_step_over_seeds_and_the_table_reads_the_mean_curve():
    a = [_point(0, 3.0, 1.0, 0.0), _point(5, 4.0, 2.0, 0.2)]
    b = [_point(0, 3.2, 1.2, 0.0), _point(5, 3.0, 3.0, 0.4)]
    mean = mean_points([a, b])
    assert [p["step"] for p in mean] == [0, 5]
    assert mean[1]["gold"] == pytest.approx({"aggregate": 3.5, "alignment": 4.5})
    assert (mean[1]["proxy"], mean[1]["deviation"]) == pytest.approx((2.5, 0.3))
    # the mean gold 3.1 -> 3.5 peaks at the end, although seed b's gold fell
    rows = peak_table({"risd": mean}, {"risd": "Student RISD"})
    assert rows[2] == "| Student RISD (optimised) | 5 | 0.3 | 3.100 | 3.500 | 3.500 (step 5) | 2.500 |"
    with pytest.raises(ValueError, match="different steps"):
        mean_points([a, [_point(0, 1.0), _point(6, 1.0)]])


def test_squared_deviation_is_the_hand_sum_and_count():
    tuned = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    base = torch.tensor([[1.0, 0.0], [0.0, 4.0]])
    assert squared_deviation(tuned, base).tolist() == [4.0 + 9.0, 4.0]  # mean 13/4


def test_sweep_settings_reject_unknown_rewards_and_bad_intervals():
    with pytest.raises(ValueError, match=r"sweep.rewards \['risd', 'clip'\].*'student_sft'"):
        SweepSettings(rewards=("risd", "clip"))
    with pytest.raises(ValueError, match="every <= steps"):
        SweepSettings(steps=4, every=5)


@pytest.fixture(scope="module")
def sd_with_probe(tmp_path_factory):
    path = make_tiny_t2i(tmp_path_factory.mktemp("overopt") / "sd", "sd")
    adapter = load_adapter(path)
    sampler = SamplerConfig(num_steps=4, guidance_scale=3.0, height=32, width=32)
    probe = build_probe(adapter, ["a red cube", "a blue ball"], sampler, num_timesteps=3, seed=0)
    return path, adapter, probe


def test_probe_is_fixed_and_spreads_the_timesteps(sd_with_probe):
    path, adapter, probe = sd_with_probe
    assert probe.latents.shape[0] == 6 and probe.prompts == ["a red cube", "a blue ball"] * 3
    timesteps = adapter.set_timesteps(4, 32, 32)
    assert probe.timesteps.tolist() == [int(timesteps[i]) for i in (0, 0, 2, 2, 3, 3)]  # linspace(0, 3, 3)
    again = build_probe(
        load_adapter(path),
        ["a red cube", "a blue ball"],
        SamplerConfig(num_steps=4, guidance_scale=3.0, height=32, width=32),
        3,
        0,
    )
    assert torch.equal(again.latents, probe.latents)


def test_deviation_is_zero_for_a_zero_lora_and_the_hand_mean_otherwise(sd_with_probe):
    path, _, probe = sd_with_probe
    tuned = load_adapter(path)
    tuned.add_lora(rank=2)  # B = 0: the LoRA adds nothing
    assert prediction_deviation(tuned, probe, batch_size=4) == 0.0
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in tuned.lora_parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    got = prediction_deviation(tuned, probe, batch_size=4)  # batches of 4 and 2
    # by hand: a separately loaded pipeline without any LoRA gives the base prediction
    base = load_adapter(path)
    with torch.no_grad():
        cond = tuned.encode_prompts(probe.prompts, guidance_scale=1.0)
        f_lora = tuned.model_output_at(probe.latents, probe.timesteps, cond)
        f_base = base.model_output_at(
            probe.latents, probe.timesteps, base.encode_prompts(probe.prompts, guidance_scale=1.0)
        )
    expected = float(((f_lora.double() - f_base.double()) ** 2).mean())
    assert got > 0 and got == pytest.approx(expected, rel=1e-6)
