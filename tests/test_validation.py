"""Held-out validation of ``zr finetune-t2i``: the statistics by hand, then selection and early stopping
end to end with a judge whose values the test sets, so the kept step is known exactly."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.test_t2i_recipes import _finetune_args, tiny  # noqa: F401 (the module fixture)
from zr_diffusion.cli import main
from zr_diffusion.config import ConfigError, load_config
from zr_diffusion.pipelines import validation
from zr_diffusion.pipelines.base import LORA_WEIGHT_NAME
from zr_diffusion.pipelines.config import FinetuneT2IConfig, JudgeConfig, RewardConfig, ValidationConfig
from zr_diffusion.pipelines.judges import JudgeOutput
from zr_diffusion.pipelines.validation import Selection, hacking_warnings, mean_and_se, select_best

# ---- the statistics by hand ------------------------------------------------------------------------


def test_mean_and_standard_error_by_hand():
    # mean 2.5; sample variance ((1.5² + 0.5²) · 2) / 3 = 5/3; SE = sqrt(5/3) / sqrt(4) = 0.645497
    assert mean_and_se(torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx((2.5, math.sqrt(5 / 3) / 2))
    assert mean_and_se(torch.tensor([3.0, 3.0])) == (3.0, 0.0)
    with pytest.raises(ValueError, match="N >= 2"):
        mean_and_se(torch.tensor([1.0]))


def _entry(step, reward, judge, judge_se=0.1):
    return {"step": step, "reward": reward, "reward_se": 0.1, "judge/j": judge, "judge/j_se": judge_se}


def test_select_best_keeps_the_earliest_maximum_and_counts_the_validations_after_it():
    entries = [_entry(0, 1.0, 1.0), _entry(2, 3.0, 0.5), _entry(4, 2.0, 0.7), _entry(6, 3.0, 0.2)]
    assert select_best(entries, "reward") == Selection(step=2, value=3.0, se=0.1, since=2, count=4)
    assert select_best(entries, "judge/j") == Selection(step=0, value=1.0, se=0.1, since=3, count=4)
    assert select_best([], "reward") is None


def test_hacking_warning_needs_a_reward_rise_and_a_judge_drop_beyond_two_standard_errors():
    first = _entry(0, 3.0, 2.0)
    (w,) = hacking_warnings(first, _entry(4, 3.5, 1.7, judge_se=0.1), ["j"])  # drop 0.3 > 2 · 0.1
    assert (w["step"], w["since_step"], w["judge"]) == (4, 0, "j")
    assert w["reward"] == [3.0, 3.5] and w["judge_value"] == [2.0, 1.7] and w["judge_se"] == 0.1
    assert (
        "reward rose 3.0000 -> 3.5000" in w["message"] and "judge 'j' fell 2.0000 -> 1.7000" in w["message"]
    )
    assert hacking_warnings(first, _entry(4, 3.5, 1.85, judge_se=0.1), ["j"]) == []  # drop 0.15 < 0.2
    assert hacking_warnings(first, _entry(4, 2.9, 1.0), ["j"]) == []  # the reward fell too: no hacking
    assert hacking_warnings(first, _entry(4, 3.5, 2.5), ["j"]) == []  # the judge rose


def test_validation_config_errors_name_the_field():
    judges = {"clip": JudgeConfig(kind="clipscore", path="c")}
    with pytest.raises(ValueError, match=r"select_by is 'clp'; valid: \['reward', 'clip'\]"):
        ValidationConfig(judges=judges, select_by="clp")
    with pytest.raises(ValueError, match="patience needs validation.select_by"):
        ValidationConfig(patience=2)
    with pytest.raises(ValueError, match="at least 2 items"):
        ValidationConfig(num_prompts=1, seeds=(0,))
    with pytest.raises(ValueError, match="validation.judges.clip.path"):
        ValidationConfig(judges={"clip": JudgeConfig(kind="clipscore")})
    with pytest.raises(ValueError, match="not a valid judge name"):
        ValidationConfig(judges={"reward": JudgeConfig(path="r")})
    with pytest.raises(ValueError, match="set validation.every instead"):
        load_config(
            FinetuneT2IConfig, None, ["pipeline=p", "reward.model=r", "prompts=x", "run.eval_every=5"]
        )
    with pytest.raises(ConfigError, match="unknown key 'validation.judge'"):
        load_config(
            FinetuneT2IConfig, None, ["pipeline=p", "reward.model=r", "prompts=x", "validation.judge.path=j"]
        )
    assert RewardConfig(model="r").sources == ("r",)


# ---- selection and early stopping end to end -------------------------------------------------------


class ScriptedJudge(torch.nn.Module):
    """A judge whose mean at validation k is ``means[k]``; items get +0.01 · i so that the SE is > 0."""

    dimensions = ("scripted",)

    def __init__(self, means: list[float]):
        super().__init__()
        self.means, self.calls = means, 0

    def forward(self, images: torch.Tensor, prompts: list[str]) -> JudgeOutput:
        mean = self.means[self.calls]  # one call per validation: batch_size covers every item
        self.calls += 1
        mu = (mean + 0.01 * (torch.arange(len(prompts)) - (len(prompts) - 1) / 2))[:, None]  # [B, 1]
        return JudgeOutput(mu=mu, reward=mu[:, 0])


@pytest.fixture(scope="module")
def plain_two_steps(tiny):  # noqa: F811
    """The LoRA after 2 steps of the same training, without validation."""
    out = tiny["root"] / "plain-2-steps"
    assert main(_finetune_args(tiny, "zimage", out, 2, "validation.enabled=false")) == 0
    return load_file(out / "final" / LORA_WEIGHT_NAME)


def _assert_same_lora(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def _scripted_run(tiny, out, means, *extra, steps=6):  # noqa: F811
    judge = ScriptedJudge(means)
    args = _finetune_args(tiny, "zimage", out, steps, "validation.every=1", "validation.seeds=[0, 1]")
    args += ["validation.batch_size=4", "validation.judges.scripted.path=set-by-test"]
    args += ["validation.select_by=scripted", *extra]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(validation, "build_judges", lambda vcfg, device: {"scripted": judge})
        assert main(args) == 0
    return json.loads((out / "metrics.json").read_text()), judge


def test_patience_stops_and_best_holds_the_lora_of_the_best_judged_step(tiny, plain_two_steps, capsys):  # noqa: F811
    out = tiny["root"] / "scripted"
    # validations at steps 0, 1, 2, 3, 4: the judge peaks at step 2, then 2 validations do not beat it
    metrics, judge = _scripted_run(
        tiny, out, [1.0, 2.0, 3.0, 2.5, 2.9, 9.0], "validation.patience=2", "validation.keep_loras=true"
    )
    assert judge.calls == 5 and [e["step"] for e in metrics["validation"]] == [0, 1, 2, 3, 4]
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3, 4]  # max_steps=6, stopped after step 4
    assert [e["judge/scripted"] for e in metrics["validation"]] == pytest.approx([1.0, 2.0, 3.0, 2.5, 2.9])
    sel = metrics["selection"]
    assert (sel["step"], sel["select_by"], sel["lora"]) == (2, "scripted", str(out / "best"))
    assert sel["value"] == pytest.approx(3.0) and sel["se"] == pytest.approx(
        0.01 * math.sqrt(5 / 3) / 2, rel=1e-4
    )
    assert (
        "step 2 has the highest judge/scripted" in sel["reason"]
        and "stopped early at step 4" in sel["reason"]
    )
    assert metrics["stopped_early"]["step"] == 4 and metrics["stopped_early"]["patience"] == 2
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 2
    printed = capsys.readouterr().out
    assert f"kept step 2 in {out / 'best'}" in printed and "stopped early at step 4" in printed

    # best/ is the LoRA after exactly 2 steps: an unvalidated 2-step run ends with the same weights
    best = load_file(out / "best" / LORA_WEIGHT_NAME)
    _assert_same_lora(best, plain_two_steps)
    final = load_file(out / "final" / LORA_WEIGHT_NAME)  # the stop step's LoRA, not the best one
    assert any(not torch.equal(final[k], best[k]) for k in best)
    # keep_loras: every validation's LoRA, each in its own folder; step 2's is best/, step 4's final/
    kept = [validation.validation_lora_dir(out, s) for s in range(5)]
    assert [e["lora"] for e in metrics["validation"]] == [str(p) for p in kept]
    _assert_same_lora(load_file(kept[2] / LORA_WEIGHT_NAME), best)
    _assert_same_lora(load_file(kept[4] / LORA_WEIGHT_NAME), final)
    assert all(not v.any() for k, v in load_file(kept[0] / LORA_WEIGHT_NAME).items() if "lora_B" in k)


def test_without_patience_the_run_goes_on_and_a_later_best_replaces_best(tiny, capsys):  # noqa: F811
    out = tiny["root"] / "scripted-no-patience"
    metrics, _ = _scripted_run(tiny, out, [1.0, 3.0, 0.5, 4.0], steps=3)
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3] and metrics["stopped_early"] is None
    assert metrics["selection"]["step"] == 3 and "0 later validation(s)" in metrics["selection"]["reason"]
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 3
    # step 2's judge fell 0.5 below step 0 (SE 0.006): a warning exactly when the reward rose by then
    first, *rest = metrics["validation"]
    expected = [w for e in rest for w in hacking_warnings(first, e, ["scripted"])]
    assert metrics["hacking_warnings"] == expected
    assert [w["step"] for w in expected] == ([2] if rest[1]["reward"] > first["reward"] else [])
    printed = capsys.readouterr().out
    assert all(f"WARNING: {w['message']}" in printed for w in expected)


def test_resume_rewrites_best_when_the_run_stopped_between_checkpoint_and_best(tiny, plain_two_steps):  # noqa: F811
    out = tiny["root"] / "scripted-resume"
    _scripted_run(tiny, out, [1.0, 2.0, 3.0], steps=2)  # best at step 2, checkpointed at step 2
    # as if the run died after the step-2 checkpoint, before best/ was written: best/ still holds step 1
    (out / "best" / "selection.json").write_text(json.dumps({"step": 1, "select_by": "scripted"}))
    (out / "best" / LORA_WEIGHT_NAME).unlink()
    metrics, judge = _scripted_run(tiny, out, [2.5], "--resume", steps=3)  # step 3 does not beat step 2
    assert judge.calls == 1 and [e["step"] for e in metrics["validation"]] == [0, 1, 2, 3]
    assert [e["step"] for e in metrics["train"]] == [1, 2, 3] and metrics["selection"]["step"] == 2
    assert json.loads((out / "best" / "selection.json").read_text())["step"] == 2
    _assert_same_lora(load_file(out / "best" / LORA_WEIGHT_NAME), plain_two_steps)


def test_finetune_with_a_min_ensemble_logs_each_member(tiny):  # noqa: F811
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    second = make_tiny_vlm(tiny["root"] / "reward-b", "qwen2_vl", seed=1)
    out = tiny["root"] / "ensemble"
    args = _finetune_args(tiny, "zimage", out, 1, "validation.seeds=[0, 1]")
    args += ["reward.model=''", f"reward.models=[{tiny['reward']}, {second}]", "reward.aggregate=min"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["validation"]] == [0, 1]
    for e in metrics["validation"]:
        # the per-item minimum of two members averages to at most the lower member mean
        assert e["reward"] <= min(e["member/0"], e["member/1"]) + 1e-6
        assert e["member/0"] != e["member/1"] and e["member/0_se"] > 0
    assert math.isfinite(metrics["train"][0]["loss"])
