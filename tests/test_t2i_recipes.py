"""The t2i recipes end to end on tiny offline models: ``zr finetune-t2i``, ``zr train-t2i-sft``, ``zr eval-t2i``.

Everything goes through ``cli.main`` with the shipped tiny configs plus overrides that point at
models built here (tiny pipelines of the real diffusers classes, a tiny Qwen-VL reward model).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from zr_diffusion.cli import main
from zr_diffusion.config import load_config
from zr_diffusion.pipelines import reward_finetune, sft
from zr_diffusion.pipelines.adapters import ADAPTERS
from zr_diffusion.pipelines.base import LORA_WEIGHT_NAME
from zr_diffusion.pipelines.config import EvalT2IConfig, FinetuneT2IConfig, SFTT2IConfig
from zr_diffusion.pipelines.prompts import PromptFileError, load_prompts
from zr_diffusion.pipelines.tiny import build_tiny_t2i, make_tiny_t2i
from zr_diffusion.vlm.tiny import make_tiny_vlm

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "t2i"
PROMPTS = ["a red cube", "a blue sky", "a green tree", "a yellow sun"]
FAST = ["run.tensorboard=false", "run.progress=false", "run.device=cpu"]


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny sd / zimage pipelines, a tiny reward model, a prompt file and SFT records with images."""
    from zr_diffusion.data import save_image

    root = tmp_path_factory.mktemp("t2i")
    paths = {f: make_tiny_t2i(root / f, f) for f in ("sd", "zimage")}
    paths["reward"] = make_tiny_vlm(root / "reward", "qwen2_vl")
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("# training prompts\n" + "\n".join(PROMPTS) + "\n")
    scored, minimal = [], []
    gen = torch.Generator().manual_seed(0)
    for i, prompt in enumerate(PROMPTS):
        save_image(torch.rand(3, 40, 40, generator=gen), root / "images" / f"{i}.png")
        minimal.append({"prompt": prompt, "image": f"images/{i}.png"})
        for d, score in (("alignment", 2.0 + i), ("realism", 1.0 + i)):
            scored.append(
                {
                    "id": f"{i}-{d}",
                    "prompt": prompt,
                    "image": f"images/{i}.png",
                    "dimension": d,
                    "score": score,
                }
            )
    paths["scored"], paths["minimal"] = root / "scored.jsonl", root / "minimal.jsonl"
    paths["scored"].write_text("".join(json.dumps(r) + "\n" for r in scored))
    paths["minimal"].write_text("".join(json.dumps(r) + "\n" for r in minimal))
    paths["root"] = root
    return paths


def _finetune_args(tiny, family: str, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "finetune-t2i",
        "--config",
        str(CONFIGS / f"{family}_zreward_tiny.yaml"),
        f"pipeline={tiny[family]}",
        f"reward.model={tiny['reward']}",
        f"prompts={tiny['prompts']}",
        f"run.output_dir={out}",
        f"run.max_steps={steps}",
        "sampler.num_steps=2",
        *FAST,
        *extra,
    ]


@pytest.fixture(scope="module")
def sd_run(tiny):
    """Two reward-gradient steps on SD with the regulariser and validation with three judges: the
    student on a dimension it does not optimise (from the tiny config), open_clip and torchmetrics CLIPScore.

    ``add_lora`` is wrapped to keep the adapter and every denoiser weight right after the LoRA is added.
    """
    from zr_diffusion.pipelines.judges import CLIPScoreJudge, OpenCLIPJudge

    seen = {}
    add_lora = reward_finetune.add_lora

    def spy(adapter, *args):
        params = add_lora(adapter, *args)
        seen["adapter"] = adapter
        seen["before"] = {n: p.detach().clone() for n, p in adapter.denoiser.named_parameters()}
        return params

    out = tiny["root"] / "run-sd"
    judges = {
        "student_aesthetics": {"path": str(tiny["reward"])},
        "openclip": {"kind": "openclip", "path": str(OpenCLIPJudge.make_tiny(tiny["root"] / "openclip"))},
        "clipscore": {"kind": "clipscore", "path": str(CLIPScoreJudge.make_tiny(tiny["root"] / "clipscore"))},
    }
    args = _finetune_args(tiny, "sd", out, 2, "reg_weight=1.0", "validation.seeds=[0, 1]")
    args += [f"validation.judges.{n}.{k}={v}" for n, judge in judges.items() for k, v in judge.items()]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(reward_finetune, "add_lora", spy)
        rc = main([*args, "run.tensorboard=true", "run.save_every=1"])
    assert rc == 0
    return {"out": out, **seen}


@pytest.fixture(scope="module")
def zimage_run(tiny):
    """Two uninterrupted steps on Z-Image (flow matching), a checkpoint after each."""
    out = tiny["root"] / "run-zimage"
    assert main(_finetune_args(tiny, "zimage", out, 2, "reg_weight=0.5", "validation.enabled=false")) == 0
    return out


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ---- configs and prompt files ----------------------------------------------------------------------


CONFIG_CLASSES = {
    "sft": SFTT2IConfig,
    "sft_tiny": SFTT2IConfig,
    "eval": EvalT2IConfig,
    "eval_tiny": EvalT2IConfig,
}


def test_every_t2i_yaml_loads_with_its_config_class():
    files = sorted(CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= {
        "zimage_zreward",
        "flux_zreward",
        "sdxl_zreward",
        "sd15_zreward",
        "sft",
        "eval",
    }
    for f in files:
        cfg = load_config(CONFIG_CLASSES.get(f.stem, FinetuneT2IConfig), f)
        assert cfg.pipeline


def test_config_invariants_name_the_field():
    from zr_diffusion.pipelines.config import JudgeConfig, RewardConfig
    from zr_diffusion.training import RunConfig

    reward = RewardConfig(model="r")
    with pytest.raises(ValueError, match="batch_size=3 .* run.grad_accum=2"):
        FinetuneT2IConfig(pipeline="p", reward=reward, prompts="x", batch_size=3, run=RunConfig(grad_accum=2))
    with pytest.raises(ValueError, match="one weight per dimension"):
        RewardConfig(model="r", dimensions=("alignment", "realism"), weights=(1.0,))
    with pytest.raises(ValueError, match="reward.model"):
        FinetuneT2IConfig(pipeline="p", prompts="x")
    judge = JudgeConfig(path="j")
    with pytest.raises(ValueError, match="base vs base"):
        EvalT2IConfig(pipeline="p", prompts="x", judge=judge)
    with pytest.raises(ValueError, match="apply to kind 'zreward' only"):
        JudgeConfig(kind="openclip", path="j", dimensions=("alignment",))


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("# header\n a cat \n\n# another\na dog\n")
    assert load_prompts(txt) == ["a cat", "a dog"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a cat", "id": 1}\n\n{"prompt": "a dog"}\n')
    assert load_prompts(jsonl) == ["a cat", "a dog"]
    jsonl.write_text('{"prompt": "a cat"}\n{"text": "a dog"}\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: .*\"prompt\""):
        load_prompts(jsonl)
    jsonl.write_text('{"prompt": "a cat"}\nnot json\n')
    with pytest.raises(PromptFileError, match=r"p\.jsonl:2: not valid JSON"):
        load_prompts(jsonl)
    txt.write_text("# only comments\n\n")
    with pytest.raises(PromptFileError, match="has no prompts"):
        load_prompts(txt)
    csv = tmp_path / "p.csv"
    csv.write_text("a cat\n")
    with pytest.raises(PromptFileError, match="unknown type '.csv'"):
        load_prompts(csv)
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "missing.txt")


# ---- finetune-t2i ----------------------------------------------------------------------------------


def test_finetune_sd_loss_finite_lora_moves_base_frozen(sd_run):
    train = _metrics(sd_run["out"])["train"]
    assert [e["step"] for e in train] == [1, 2]
    assert all(math.isfinite(e["loss"]) and math.isfinite(e["reward"]) for e in train)
    after = dict(sd_run["adapter"].denoiser.named_parameters())
    lora = [n for n in after if "lora_" in n]
    assert lora and all(not torch.equal(after[n].detach(), sd_run["before"][n]) for n in lora), (
        "a LoRA weight did not move"
    )
    base = [n for n in after if "lora_" not in n]
    assert all(torch.equal(after[n].detach(), sd_run["before"][n]) for n in base), "a base weight moved"
    assert all(not after[n].requires_grad for n in base)


def test_regulariser_is_zero_at_the_first_step_and_positive_later(sd_run):
    reg = [e["reg"] for e in _metrics(sd_run["out"])["train"]]
    assert reg[0] == 0.0  # LoRA B starts at zero: LoRA-on and LoRA-off outputs are identical
    assert reg[1] > 0


def test_validation_grid_reward_per_dimension_and_judges_with_standard_errors(sd_run):
    out = sd_run["out"]
    metrics = _metrics(out)
    base, val = metrics["validation"]  # validation.every = 2 in the tiny config: the base, then the end
    assert base["step"] == 0 and val["step"] == 2 and val["n_items"] == 2 * 2  # 2 prompts x 2 seeds
    assert Path(val["grid"]) == out / "validation" / "step-0000002.png"
    assert Path(val["grid"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = {
        "reward",
        "mu/alignment",
        "mu/realism",
        "judge/student_aesthetics",
        "judge/openclip",
        "judge/clipscore",
    }
    assert keys <= set(val) and {f"{k}_se" for k in keys} <= set(val)
    assert all(val[f"{k}_se"] > 0 for k in keys)
    assert val["reward"] == pytest.approx((2 * val["mu/alignment"] + val["mu/realism"]) / 3)  # weights [2, 1]
    assert (out / "validation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [
        ("validation", 0),
        ("train", 1),
        ("train", 2),
        ("validation", 2),
    ]
    assert lines[-1]["judge/openclip"] == val["judge/openclip"]
    # the tiny config selects by the student judge with patience 2: step 0 or 2 is kept in best/
    selection = metrics["selection"]
    best = max((base, val), key=lambda e: e["judge/student_aesthetics"])
    assert selection["step"] == best["step"] and selection["select_by"] == "student_aesthetics"
    assert (out / "best" / LORA_WEIGHT_NAME).is_file() and metrics["stopped_early"] is None
    tags = set()
    for f in (out / "logs").rglob("events.out.tfevents.*"):
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags |= set(EventAccumulator(str(f)).Reload().Tags()["scalars"])
    assert {"val/reward", "val/reward_se", "val/judge/openclip", "train/reward"} <= tags
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


def test_saved_lora_loads_into_a_fresh_pipeline_and_changes_its_output(tiny, sd_run):
    lora = sd_run["out"] / "final"
    assert (lora / LORA_WEIGHT_NAME).is_file()
    pipe = DiffusionPipeline.from_pretrained(str(tiny["sd"]))
    pipe.set_progress_bar_config(disable=True)

    def image():
        gen = torch.Generator().manual_seed(0)
        kw = dict(num_inference_steps=2, height=32, width=32, output_type="pt", generator=gen)
        return pipe(PROMPTS[:1], **kw).images

    before = image()
    pipe.load_lora_weights(str(lora))
    assert (image() - before).abs().max() > 1e-6


def test_reward_runs_in_its_own_dtype_under_the_generators_autocast(tiny):
    """sd15_zreward.yaml: a bfloat16 reward model while the generator step runs under float16
    autocast. Every Linear of the reward computes in bfloat16, and the reward equals the reward of the
    same images scored outside any autocast."""
    from zr_diffusion.pipelines.sampler import SamplerConfig
    from zr_diffusion.reward.model import ZRewardModel

    adapter = reward_finetune.load_t2i_adapter(str(tiny["sd"]), None, "float32", "cpu")
    reward = ZRewardModel.from_pretrained(tiny["reward"], dimensions=["realism"], dtype=torch.bfloat16)
    dtypes, scored = set(), []
    hooks = [
        m.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
        for m in reward.modules()
        if isinstance(m, torch.nn.Linear)
    ]

    def recording_reward(images, prompts):
        scored.append(images.detach().clone())
        return reward(images, prompts)

    sampler = SamplerConfig(num_steps=2, guidance_scale=5.0, height=32, width=32)
    with torch.autocast("cpu", dtype=torch.float16):
        terms = reward_finetune.reward_loss(
            adapter, recording_reward, PROMPTS[:2], sampler, torch.Generator().manual_seed(0)
        )
    for h in hooks:
        h.remove()
    assert dtypes == {torch.bfloat16}
    with torch.no_grad():
        torch.testing.assert_close(
            terms.reward.detach(), reward(scored[0], PROMPTS[:2]).reward, rtol=0, atol=0
        )


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(tiny, zimage_run):
    train = _metrics(zimage_run)["train"]
    assert len(train) == 2 and all(math.isfinite(e["loss"]) for e in train)
    assert train[0]["reg"] == 0.0 and train[1]["reg"] > 0
    out = tiny["root"] / "run-zimage-resumed"
    assert main(_finetune_args(tiny, "zimage", out, 1, "reg_weight=0.5", "validation.enabled=false")) == 0
    assert (
        main(
            [
                *_finetune_args(tiny, "zimage", out, 2, "reg_weight=0.5", "validation.enabled=false"),
                "--resume",
            ]
        )
        == 0
    )
    whole, resumed = (load_file(d / "final" / LORA_WEIGHT_NAME) for d in (zimage_run, out))
    assert whole.keys() == resumed.keys()
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-6)
    assert max(v.abs().max() for k, v in whole.items() if "lora_B" in k) > 0
    assert [e["step"] for e in _metrics(out)["train"]] == [1, 2]


# ---- train-t2i-sft ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "zimage"])
def test_sft_targets_match_the_adapters_sampling_math(family):
    """With the exact target as model output, the adapter's own step recovers x0 at every step."""
    adapter = ADAPTERS[family](build_tiny_t2i(family))
    adapter.set_timesteps(3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 4, 16, 16, generator=gen)
    torch.testing.assert_close(adapter.unscale_latents(sft.scale_latents(adapter, z)), z)
    for i in range(3):
        t = adapter.timesteps[i].expand(2)
        noisy, _, target = sft.noise_and_target(adapter, z, gen, timesteps=t)
        torch.testing.assert_close(adapter.step(target, i, noisy).pred_x0, z, rtol=1e-4, atol=1e-4)


def test_train_t2i_sft_on_scored_and_minimal_records(tiny):
    out = tiny["root"] / "sft-sd"
    args = ["train-t2i-sft", "--config", str(CONFIGS / "sft_tiny.yaml"), f"pipeline={tiny['sd']}"]
    args += [f"records={tiny['scored']}", "min_score=3.0", f"run.output_dir={out}", "run.max_steps=2", *FAST]
    assert main(args) == 0
    metrics = _metrics(out)
    assert len(metrics["train"]) == 2 and all(math.isfinite(e["loss"]) for e in metrics["train"])
    assert (out / "final" / LORA_WEIGHT_NAME).is_file()
    kept = sft.load_sft_examples(tiny["scored"], min_score=3.0)
    assert [e.prompt for e in kept] == PROMPTS[2:]  # means 1.5, 2.5, 3.5, 4.5 over two dimensions
    out = tiny["root"] / "sft-zimage"
    args = ["train-t2i-sft", "--config", str(CONFIGS / "sft_tiny.yaml"), f"pipeline={tiny['zimage']}"]
    args += [
        f"records={tiny['minimal']}",
        "min_score=null",
        f"run.output_dir={out}",
        "run.max_steps=1",
        *FAST,
    ]
    assert main(args) == 0
    assert (out / "final" / LORA_WEIGHT_NAME).is_file()


# ---- eval-t2i --------------------------------------------------------------------------------------


def _eval_args(tiny, out: Path, *extra: str) -> list[str]:
    return [
        "eval-t2i",
        "--config",
        str(CONFIGS / "eval_tiny.yaml"),
        f"pipeline={tiny['sd']}",
        f"prompts={tiny['prompts']}",
        f"judge.path={tiny['reward']}",
        f"output_dir={out}",
        "num_steps=2",
        *extra,
    ]


def test_eval_t2i_writes_gsb_report_and_review_page(tiny, sd_run, capsys):
    out = tiny["root"] / "eval"
    assert main(_eval_args(tiny, out, f"lora_a={sd_run['out'] / 'final'}", "seeds=[0, 1]")) == 0
    summary = json.loads((out / "gsb.json").read_text())
    assert summary["n_items"] == 2 * len(PROMPTS) == len(summary["items"])
    assert summary["good"] + summary["same"] + summary["bad"] == summary["n_items"]
    assert summary["gsb"] == pytest.approx((summary["good"] - summary["bad"]) / summary["n_items"])
    assert set(summary["per_dimension"]) == {"alignment", "realism", "aesthetics", "plausibility"}
    assert summary["label_b"] == "base"
    assert "GSB" in (out / "gsb.md").read_text()
    assert (out / "review" / "index.html").is_file() and (out / "review.key.json").is_file()
    printed = capsys.readouterr().out
    assert str(out / "gsb.json") in printed and str(out / "review" / "index.html") in printed


# ---- errors that stop a run ------------------------------------------------------------------------


def _fails(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err


def test_bad_prompt_file_stops_with_file_and_line(tiny, capsys):
    bad = tiny["root"] / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"caption": "no prompt"}\n')
    _fails(_finetune_args(tiny, "sd", tiny["root"] / "bad-run", 1, f"prompts={bad}"), capsys, f"{bad}:2")


def test_missing_lora_folder_stops(tiny, capsys):
    missing = tiny["root"] / "no-such-lora"
    _fails(
        _eval_args(tiny, tiny["root"] / "eval-missing", f"lora_a={missing}"),
        capsys,
        "lora_a",
        str(missing),
        "does not exist",
    )


def test_lora_of_another_family_stops(tiny, zimage_run, capsys):
    args = _eval_args(tiny, tiny["root"] / "eval-family", f"lora_a={zimage_run / 'final'}")
    _fails(args, capsys, "lora_a", "'zimage'", "'sd'")


def test_enable_xformers_without_cuda_or_package_fails_clearly(tiny, capsys):
    _fails(
        _finetune_args(tiny, "sd", tiny["root"] / "xformers", 1, "enable_xformers=true"),
        capsys,
        "enable_xformers=true",
    )
