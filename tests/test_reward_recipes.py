"""End-to-end reward recipes on tiny offline models: sft, rewarddance, risd, opd via ``zr train-reward``.

What must move moves (every LoRA weight), what must stay frozen stays (base weights, the teacher), the
final folder loads as a ZRewardModel, the RISD teacher cache is reused, resume is exact, and bad
inputs stop early with a message that says what is wrong.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests._vlm_fixtures import tiny_vlm_dir
from zr_diffusion.cli import main
from zr_diffusion.reward.tiny_data import write_tiny_records

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reward"
FAMILY = "qwen2_vl"  # the fastest tiny family on a CPU; the YAMLs' qwen3_5 runs the same code


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_recipes")
    train, evaluation = write_tiny_records(root / "data", per_prompt=2, eval_per_prompt=2)
    student = tiny_vlm_dir(FAMILY)
    teacher = tiny_vlm_dir(FAMILY, seed=1)
    return {"root": root, "train": train, "eval": evaluation, "student": student, "teacher": teacher}


def _args(world, method: str, out: Path, *extra: str) -> list[str]:
    return [
        "train-reward",
        "--config",
        str(CONFIGS / f"{method}_tiny.yaml"),
        f"model={world['student']}",
        f"distill.teacher={world['teacher']}",
        f"distill.cache_dir={world['root'] / 'teacher_cache'}",
        f"data.train={world['train']}",
        f"data.eval={world['eval']}",
        f"run.output_dir={out}",
        "run.max_steps=2",
        "run.eval_every=0",
        "run.save_every=0",
        "run.tensorboard=false",
        "run.progress=false",
        "rollout.max_new_tokens=4",
        "distill.teacher_rollouts=1",
        *extra,
    ]


def _initial_lora(world, method: str, out: Path) -> dict[str, torch.Tensor]:
    """The LoRA weights a run starts from (same config and seed), under the adapter file's names."""
    from zr_diffusion.config import load_config
    from zr_diffusion.reward.config import TrainRewardConfig
    from zr_diffusion.reward.policy import setup_policy
    from zr_diffusion.training import make_accelerator

    cfg = load_config(TrainRewardConfig, CONFIGS / f"{method}_tiny.yaml", _args(world, method, out)[3:])

    state = setup_policy(cfg, make_accelerator(cfg.run)).trainable_state()
    return {k.replace(".default", ""): v for k, v in state.items()}


@pytest.fixture(scope="module")
def runs(world):
    """One short run per method (shared by the checks below); RISD builds the teacher cache."""
    out = {}
    for method in ("sft", "rewarddance", "risd", "opd"):
        path = world["root"] / f"run-{method}"
        assert main(_args(world, method, path, "run.eval_every=1")) == 0, method
        out[method] = path
    return out


@pytest.mark.parametrize("method", ["sft", "rewarddance", "risd", "opd"])
def test_recipe_trains_lora_and_saves_a_loadable_reward_model(world, runs, method):
    from zr_diffusion.reward.model import ZRewardModel

    out = runs[method]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["train"]) == 2
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in metrics["train"])
    assert metrics["eval"] and "hpa" in metrics["eval"][-1]

    # every LoRA weight moved
    start = _initial_lora(world, method, out)
    adapter = load_file(str(out / "model" / "adapter" / "adapter_model.safetensors"))
    assert set(adapter) == set(start) and len(start) > 0
    for name, value in adapter.items():
        assert not torch.equal(value, start[name]), f"{name} did not move"

    # frozen base weights did not: every weight outside the adapted layers equals the base model's
    from zr_diffusion.vlm.loading import load_vlm

    base = dict(load_vlm(world["student"])[0].named_parameters())
    final = dict(load_vlm(out / "model")[0].named_parameters())
    adapted = {k.split(".lora_")[0].removeprefix("base_model.model.") for k in adapter}
    assert set(final) == set(base)
    for name, value in base.items():
        if name.endswith(".weight") and name.rsplit(".", 1)[0] in adapted:
            assert not torch.equal(final[name], value), f"{name}: LoRA was not merged"
        else:
            assert torch.equal(final[name], value), f"frozen {name} changed"

    reward = ZRewardModel.from_pretrained(out / "model", dimensions=["alignment", "realism"])
    result = reward(torch.rand(2, 3, 56, 56), ["a red circle", "a small cat"])
    assert result.mu.shape == (2, 2) and torch.isfinite(result.mu).all()


def test_teacher_is_frozen(world):
    from zr_diffusion.config import load_config
    from zr_diffusion.reward.config import TrainRewardConfig
    from zr_diffusion.reward.policy import load_frozen

    cfg = load_config(TrainRewardConfig, CONFIGS / "risd_tiny.yaml", _args(world, "risd", world["root"])[3:])
    teacher = load_frozen(world["teacher"], cfg)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())


def test_risd_reuses_the_teacher_cache(world, runs, monkeypatch, capsys):
    import zr_diffusion.reward.risd as risd

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded although every target is cached")

    monkeypatch.setattr(risd, "load_frozen", no_teacher)
    capsys.readouterr()
    assert main(_args(world, "risd", world["root"] / "risd-rerun")) == 0
    assert "reusing 12 cached teacher targets" in capsys.readouterr().out
    index = json.loads(next((world["root"] / "teacher_cache").glob("*/index.json")).read_text())
    assert sum(len(s["keys"]) for s in index["shards"]) == 12


def test_resume_ends_with_the_same_weights(world, monkeypatch):
    """OPD samples tokens every step: an exact resume needs the per-step seeding to replay them."""
    import zr_diffusion.reward.loop as loop

    extra = ("run.max_steps=3", "optim.schedule=cosine", "optim.warmup_steps=1")
    full = world["root"] / "resume-full"
    assert main(_args(world, "opd", full, *extra)) == 0

    class Interrupted(Exception):
        pass

    real_save = loop.save_checkpoint

    def save_then_stop(accelerator, output_dir, step, **kw):
        path = real_save(accelerator, output_dir, step, **kw)
        if step == 2:
            raise Interrupted
        return path

    part = world["root"] / "resume-part"
    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(Interrupted):
        main(_args(world, "opd", part, *extra, "run.save_every=2"))
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert not (part / "model").exists()
    assert main([*_args(world, "opd", part, *extra, "run.save_every=2"), "--resume"]) == 0

    a = load_file(str(full / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(part / "model" / "adapter" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6)
    metrics = json.loads((part / "metrics.json").read_text())
    assert [r["step"] for r in metrics["train"]] == [1, 2, 3]
    # CPU/wall seconds in every row, growing, and the resumed process continued the checkpoint's count
    stored = json.loads((part / "checkpoints" / "step-0000003" / "trainer_state.json").read_text())
    rows = metrics["train"] + metrics["eval"]
    for key in ("cpu_seconds", "wall_seconds"):
        assert all(r[key] > 0 for r in rows), key
        train = [r[key] for r in metrics["train"]]
        assert train == sorted(train) and len(set(train)) == 3, (key, train)
        assert metrics["eval"][-1][key] >= train[-1]
    assert metrics["train"][-1]["cpu_seconds"] > metrics["train"][1]["cpu_seconds"]
    assert stored["cpu_seconds"] >= metrics["train"][-1]["cpu_seconds"]


def test_grad_accumulation_matches_one_big_batch(world):
    """batch 4 x accumulation 1 and 2 micro-batches of 2 take the same optimizer step."""
    one = world["root"] / "accum-1"
    two = world["root"] / "accum-2"
    assert main(_args(world, "sft", one, "run.max_steps=1")) == 0
    assert main(_args(world, "sft", two, "run.max_steps=1", "run.grad_accum=2")) == 0
    a = load_file(str(one / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "model" / "adapter" / "adapter_model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- bad input


def test_rewarddance_needs_rationales(world, tmp_path, capsys):
    rows = [json.loads(line) for line in world["train"].read_text().splitlines()]
    rows[1].pop("rationale")
    for row in rows:
        row["image"] = str(world["train"].parent / row["image"])
    bad = tmp_path / "no_rationale.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(_args(world, "rewarddance", tmp_path / "out", f"data.train={bad}")) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "rationale" in err


def test_opd_rejects_a_teacher_with_another_tokenizer(world, tmp_path, capsys):
    from zr_diffusion.vlm.tiny import build_tiny_tokenizer

    other = tmp_path / "other-teacher"
    shutil.copytree(world["teacher"], other)
    build_tiny_tokenizer(FAMILY, vocab_size=700).save_pretrained(other)
    assert main(_args(world, "opd", tmp_path / "out", f"distill.teacher={other}")) == 2
    err = capsys.readouterr().err
    assert "share a tokenizer" in err and str(other) in err


def test_empty_training_data_is_an_error(world, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(_args(world, "sft", tmp_path / "out", f"data.train={empty}")) == 2
    assert "has no records" in capsys.readouterr().err


def test_nan_loss_never_reaches_the_optimizer(world, tmp_path, monkeypatch, capsys):
    import zr_diffusion.reward.baselines.sft as sft

    real = sft.answer_logits
    calls = {"forward": 0, "optimizer": 0}

    def poisoned(scorer, records, mode="student"):
        calls["forward"] += 1
        logits = real(scorer, records, mode)
        return logits * float("nan") if calls["forward"] == 2 else logits

    real_step = torch.optim.AdamW.step

    def counted_step(self, *a, **k):
        calls["optimizer"] += 1
        return real_step(self, *a, **k)

    monkeypatch.setattr(sft, "answer_logits", poisoned)
    monkeypatch.setattr(torch.optim.AdamW, "step", counted_step)
    assert main(_args(world, "sft", tmp_path / "out", "run.max_steps=3")) == 2
    assert re.search(
        r"step 1: loss term 'loss' is .*nan.*optimizer step was skipped", capsys.readouterr().err
    )
    assert calls == {"forward": 2, "optimizer": 1}  # step 0 stepped, step 1 stopped before backward
    assert not (tmp_path / "out" / "model").exists()


def test_peft_policy_scorer_matches_the_saved_merged_model(world, tmp_path):
    """The scorer bound to the LoRA-wrapped policy reads the same q as the merged model folder."""
    from zr_diffusion.config import load_config
    from zr_diffusion.data import load_records
    from zr_diffusion.reward.config import TrainRewardConfig
    from zr_diffusion.reward.model import ZRewardModel
    from zr_diffusion.reward.policy import save_reward_model, setup_policy
    from zr_diffusion.reward.scoring import student_score_logits
    from zr_diffusion.training import make_accelerator

    cfg = load_config(TrainRewardConfig, CONFIGS / "sft_tiny.yaml", _args(world, "sft", tmp_path)[3:])

    policy = setup_policy(cfg, make_accelerator(cfg.run))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    policy.model.eval()
    record = load_records(world["train"])[0]
    with torch.no_grad():
        q_policy = torch.softmax(student_score_logits(policy.scorer, [record]), -1)[0]  # [S]
    save_reward_model(policy, tmp_path / "model")
    reward = ZRewardModel.from_pretrained(tmp_path / "model", dimensions=[record.dimension])
    from zr_diffusion.data import load_image

    q_saved = reward(load_image(record.image)[None], [record.prompt]).probs[0, 0]
    torch.testing.assert_close(q_saved, q_policy, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(q_policy, torch.softmax(torch.zeros_like(q_policy), -1))
