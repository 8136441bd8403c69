"""Training goes the right way: each recipe's logged loss is its own formula on its own batch, and
a few steps at a fixed seed move the objective the way it should go (reward up, loss down, HPA up).

These tests guard against bugs that leave a run finishing with finite numbers and moving weights,
but optimising the wrong thing: a flipped sign, a target paired with the wrong record, a teacher
read on another sequence. Everything runs on tiny offline models in a few seconds per test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from zr_diffusion.cli import main
from zr_diffusion.pipelines.prompts import load_prompts

T2I_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "t2i"
T2I_PROMPTS = ["a red cube", "a blue sky", "a green tree", "a yellow sun"]


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


# ---- finetune-t2i with the real tiny VLM reward ------------------------------------------------------


def make_steep_reward(folder: Path) -> Path:
    """A tiny Qwen2-VL reward whose score logits are 30x sharper than at random init.

    At random init q is nearly uniform whatever the image (μ moves by ~1e-4 between images), so a few
    LoRA steps cannot show a rise above float noise. Scaling the final RMSNorm's weight scales every
    logit, which makes μ depend visibly on the image (a spread of ~0.02) without changing the model's
    classes or code path.
    """
    from zr_diffusion.vlm.loading import load_vlm
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    source = make_tiny_vlm(folder.with_name(folder.name + "-base"), "qwen2_vl")
    vlm, processor = load_vlm(source)
    with torch.no_grad():
        vlm.model.language_model.norm.weight.mul_(30.0)
    vlm.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def steep_vlm(tmp_path_factory) -> Path:
    return make_steep_reward(tmp_path_factory.mktemp("steep") / "reward")


@pytest.fixture(scope="module")
def t2i(tmp_path_factory, steep_vlm) -> dict[str, Path]:
    from zr_diffusion.pipelines.tiny import make_tiny_t2i

    root = tmp_path_factory.mktemp("t2i_direction")
    paths = {f: make_tiny_t2i(root / f, f) for f in ("sd", "zimage")}
    paths["reward"] = steep_vlm
    paths["prompts"] = root / "prompts.txt"
    paths["prompts"].write_text("\n".join(T2I_PROMPTS) + "\n")
    paths["root"] = root
    return paths


def _t2i_args(t2i, family: str, out: Path, steps: int) -> list[str]:
    return [
        "finetune-t2i",
        "--config",
        str(T2I_CONFIGS / f"{family}_zreward_tiny.yaml"),
        f"pipeline={t2i[family]}",
        f"reward.model={t2i['reward']}",
        f"prompts={t2i['prompts']}",
        f"run.output_dir={out}",
        f"run.max_steps={steps}",
        "validation.every=0",  # validation before training (the base) and at the end only
        "run.save_every=0",
        "run.tensorboard=false",
        "run.progress=false",
        "run.device=cpu",
        "sampler.num_steps=2",
        "batch_size=4",
        "validation.num_prompts=4",  # the validation prompts are the four training prompts
        "validation.seeds=[1234]",
        f"validation.judges.student_aesthetics.path={t2i['reward']}",  # the tiny config's judge
        "validation.select_by=null",
        "validation.patience=null",
        "reg_weight=0.1",
        "optim.lr=1.0e-2",
    ]


def _t2i_setup(t2i, family: str, out: Path, steps: int):
    """The run's config, its Z-Reward model and a fresh (LoRA-free) adapter of its pipeline."""
    from zr_diffusion.config import load_config
    from zr_diffusion.pipelines.adapters import load_adapter
    from zr_diffusion.pipelines.config import FinetuneT2IConfig
    from zr_diffusion.reward.model import ZRewardModel

    args = _t2i_args(t2i, family, out, steps)
    cfg = load_config(FinetuneT2IConfig, args[2], args[3:])
    reward = ZRewardModel.from_pretrained(
        cfg.reward.model, dimensions=cfg.reward.dimensions, weights=cfg.reward.weights
    )
    return cfg, reward, load_adapter(t2i[family])


def _step0_reward(adapter, reward, cfg) -> float:
    """Mean R of the images of optimizer step 0, replayed: its prompts and its noise generator."""
    from zr_diffusion.pipelines.sampler import sample
    from zr_diffusion.training import batch_indices, step_generator

    prompts = load_prompts(cfg.prompts)
    batch = [prompts[i] for i in batch_indices(len(prompts), cfg.batch_size, cfg.run.seed, 0)]
    negative = [cfg.negative_prompt] * len(batch) if cfg.negative_prompt is not None else None
    with torch.no_grad():
        out = sample(
            adapter, batch, cfg.sampler, step_generator(cfg.run.seed, 0, 0), negative_prompts=negative
        )
        return float(reward(out.images, out.prompts).reward.mean())


def _validation_reward(adapter, reward, cfg) -> float:
    """Mean R of the validation images (training prompts x the fixed validation seeds), regenerated."""
    from zr_diffusion.pipelines.evaluate import generate

    prompts = load_prompts(cfg.prompts)[: cfg.validation.num_prompts]
    vcfg = cfg.validation
    images = generate(adapter, prompts, vcfg.seeds, cfg.sampler, vcfg.batch_size, cfg.negative_prompt)
    with torch.no_grad():
        return float(reward(images, prompts * len(vcfg.seeds)).reward.mean())


@pytest.mark.parametrize("family", ["sd", "zimage"])
def test_finetune_t2i_step_loss_is_minus_the_reward_of_its_own_images(t2i, family):
    """One step: the logged R is the mean R of step 0's own images (replayed from its prompts and its
    noise), the logged loss is −R (the regulariser is 0 while LoRA B is 0), and the update raises the
    R of that same batch."""
    out = t2i["root"] / f"one-step-{family}"
    assert main(_t2i_args(t2i, family, out, 1)) == 0
    cfg, reward, adapter = _t2i_setup(t2i, family, out, 1)
    (row,) = _metrics(out)["train"]
    assert row["reg"] == 0.0  # LoRA B starts at zero
    before = _step0_reward(adapter, reward, cfg)
    assert row["reward"] == pytest.approx(before, abs=2e-6)
    assert row["loss"] == pytest.approx(-before, abs=2e-6)
    adapter.load_lora(out / "final")
    after = _step0_reward(adapter, reward, cfg)
    assert after > before + 1e-4, f"one reward-gradient step lowered the batch's reward: {before} -> {after}"


@pytest.mark.parametrize("family", ["sd", "zimage"])
def test_finetune_t2i_raises_the_reward_on_the_training_prompts(t2i, family):
    """Four steps at a fixed seed: the validation reward (training prompts, fixed noise) rises above
    the base pipeline's, and every step's loss is −R + reg_weight · reg of that step."""
    out = t2i["root"] / f"four-steps-{family}"
    lr = "optim.lr=3.0e-2"  # the tiny reward is nearly flat: four steps at 1e-2 move it by ~1e-5
    assert main([*_t2i_args(t2i, family, out, 4), lr]) == 0
    cfg, reward, adapter = _t2i_setup(t2i, family, out, 4)
    metrics = _metrics(out)
    for row in metrics["train"]:
        assert row["loss"] == pytest.approx(-row["reward"] + cfg.reg_weight * row["reg"], abs=2e-6), row
    assert metrics["train"][-1]["reg"] > 0
    first, val = metrics["validation"]  # step 0 (the base) and the end
    assert (first["step"], val["step"]) == (0, 4)
    assert first["reward"] == pytest.approx(_validation_reward(adapter, reward, cfg), abs=2e-6)
    adapter.load_lora(out / "final")
    assert val["reward"] == pytest.approx(_validation_reward(adapter, reward, cfg), abs=2e-6)
    assert val["reward"] > first["reward"] + 5e-5, (
        f"validation reward did not rise: {first['reward']} -> {val['reward']}"
    )


# ---- reward recipes on a task small enough to learn in seconds ---------------------------------------
# Six records (three prompts x two images, one dimension): three same-prompt pairs, the brighter image
# scored higher. Every step's batch is the whole set, so the logged losses of successive steps are the
# same objective on the same records, and "falls" is a statement about the optimiser, not the batch.

REWARD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reward"
N_RECORDS = 6


@pytest.fixture(scope="module")
def rworld(tmp_path_factory):
    from tests._vlm_fixtures import tiny_vlm_dir
    from zr_diffusion.data import load_records
    from zr_diffusion.reward.tiny_data import write_tiny_records

    root = tmp_path_factory.mktemp("reward_direction")
    train, _ = write_tiny_records(root / "data", per_prompt=2, eval_per_prompt=1, dimensions=("alignment",))
    records = load_records(train)
    assert len(records) == N_RECORDS
    return {"root": root, "train": train, "records": records, "student": tiny_vlm_dir("qwen2_vl")}


def _reward_args(rworld, method: str, out: Path, *extra: str) -> list[str]:
    return [
        "train-reward",
        "--config",
        str(REWARD_CONFIGS / f"{method}_tiny.yaml"),
        f"model={rworld['student']}",
        f"data.train={rworld['train']}",
        f"data.eval={rworld['train']}",  # train-set HPA at the end
        "data.dimensions=[alignment]",
        f"distill.cache_dir={rworld['root'] / 'teacher_cache'}",
        f"run.output_dir={out}",
        "run.max_steps=6",
        "run.eval_every=0",
        "run.save_every=0",
        "run.tensorboard=false",
        "run.progress=false",
        "rollout.max_new_tokens=4",
        "distill.teacher_rollouts=1",
        f"batch_size={N_RECORDS}",
        f"eval_batch_size={N_RECORDS}",
        "optim.lr=1.0e-2",
        *extra,
    ]


def _reward_cfg(rworld, method: str, out: Path, *extra: str):
    from zr_diffusion.config import load_config
    from zr_diffusion.reward.config import TrainRewardConfig

    args = _reward_args(rworld, method, out, *extra)
    return load_config(TrainRewardConfig, args[2], args[3:])


def _train(rworld, method: str, out: Path, *extra: str) -> dict:
    assert main(_reward_args(rworld, method, out, *extra)) == 0, method
    return _metrics(out)


def _frozen(path, cfg):
    from zr_diffusion.reward.policy import load_frozen

    return load_frozen(path, cfg)


def _hpa(scorer, rworld, cfg, mode: str) -> float:
    """Train-set HPA of ``scorer`` (teacher mode: one sampled reasoning per record, seeded)."""
    from zr_diffusion.reward.scoring import eval_hpa

    torch.manual_seed(0)
    out = eval_hpa(scorer, rworld["records"], ["alignment"], N_RECORDS, mode=mode, rollout=cfg.rollout)
    assert out["pairs"] == 3
    return out["hpa"]


def _step0_records(rworld, cfg) -> list:
    from zr_diffusion.training import batch_indices

    return [rworld["records"][i] for i in batch_indices(N_RECORDS, cfg.batch_size, cfg.run.seed, 0)]


def _student_start(rworld, method: str):
    """The run folder, config, frozen base student and step 0's records of a student-side recipe."""
    out = rworld["root"] / method
    cfg = _reward_cfg(rworld, method, out)
    return out, cfg, _frozen(rworld["student"], cfg), _step0_records(rworld, cfg)


def _falls(values: list[float]) -> bool:
    return all(b < a for a, b in zip(values, values[1:]))


def test_sft_step_loss_is_its_batch_ce_it_falls_and_hpa_rises(rworld):
    """Step 1's loss is the full-vocabulary CE of the base model at each record's OWN annotated score
    token; the CE falls at every step and the train-set HPA goes from below 1 to 1."""
    from zr_diffusion.reward.scoring import answer_logits

    out, cfg, base, recs = _student_start(rworld, "sft")
    grid = cfg.grid.build()
    with torch.no_grad():
        log_p = torch.log_softmax(answer_logits(base, recs).float(), -1)  # [B, V]
    own = torch.tensor([base.token_ids[grid.bin_index(r.score)] for r in recs])
    expected = -log_p.gather(1, own[:, None]).mean()
    hpa0 = _hpa(base, rworld, cfg, "student")

    m = _train(rworld, "sft", out)
    losses = [r["loss"] for r in m["train"]]
    assert losses[0] == pytest.approx(float(expected), abs=1e-5)
    assert _falls(losses), losses
    assert hpa0 < 1.0 and m["eval"][-1]["hpa"] == 1.0, (hpa0, m["eval"])


def test_rewarddance_step_loss_is_its_batch_nll_it_falls_and_hpa_rises(rworld):
    """Step 1's loss is the mean per-record NLL of that record's OWN "score, rationale, end" answer
    under the base model; the loss falls and the train-set HPA rises to 1."""
    from zr_diffusion.reward.baselines.rewarddance import answer_ids
    from zr_diffusion.reward.scoring import record_suffix_readout

    out, cfg, base, recs = _student_start(rworld, "rewarddance")
    grid = cfg.grid.build()
    with torch.no_grad():
        read = record_suffix_readout(base, recs, [answer_ids(r, base, grid) for r in recs], mode="student")
    nll = -(read.token_logprobs * read.token_mask).sum(-1) / read.token_mask.sum(-1)  # [B]
    hpa0 = _hpa(base, rworld, cfg, "student")

    m = _train(rworld, "rewarddance", out, "run.max_steps=12")  # the rationale's NLL is most of the loss
    losses = [r["loss"] for r in m["train"]]
    assert losses[0] == pytest.approx(float(nll.mean()), abs=1e-5)
    assert _falls(losses), losses
    assert hpa0 < 1.0 and m["eval"][-1]["hpa"] == 1.0, (hpa0, m["eval"])


GDSO_SCHEDULE = ("gdso.iterations=1", "gdso.updates_per_batch=1", "gdso.steps_per_iteration=null")


@pytest.fixture(scope="module")
def gdso_teacher(rworld):
    """The Z-Reward teacher: six GDSO steps (batches of three pairs, G = 2) from the tiny base model,
    with the base model's teacher-mode HPA measured first."""
    out = rworld["root"] / "gdso"
    extra = (f"batch_size={N_RECORDS // 2}", *GDSO_SCHEDULE, "gdso.alpha_pw=0.5")  # α_pt = 1 ≠ α_pw
    cfg = _reward_cfg(rworld, "gdso", out, *extra)
    hpa0 = _hpa(_frozen(rworld["student"], cfg), rworld, cfg, "teacher")
    return {
        "out": out,
        "model": out / "model",
        "cfg": cfg,
        "hpa0": hpa0,
        "metrics": _train(rworld, "gdso", out, *extra),
    }


def test_gdso_loss_is_eq14_of_its_terms_the_direct_losses_fall_and_hpa_rises(gdso_teacher):
    """Every step's loss is L_GRPO + β KL + α_pt L_CE + α_pw L_pw of its logged terms; over six steps
    L_CE and L_pw fall, the rollout reward rises, and the teacher-mode train-set HPA rises to 1."""
    g, m = gdso_teacher["cfg"].gdso, gdso_teacher["metrics"]
    for r in m["train"]:
        expected = (
            r["pg_loss"] + g.beta * r["kl"] + g.alpha_pt * r["pointwise_ce"] + g.alpha_pw * r["pairwise_gap"]
        )
        assert r["loss"] == pytest.approx(expected, abs=1e-5), r
    first, last = m["train"][0], m["train"][-1]
    assert _falls([r["pointwise_ce"] for r in m["train"]])
    assert last["pairwise_gap"] < first["pairwise_gap"] and last["reward"] > first["reward"]
    assert gdso_teacher["hpa0"] < 1.0 and m["eval"][-1]["hpa"] == 1.0, (gdso_teacher["hpa0"], m["eval"])


def test_grpo_surrogate_falls_on_its_own_rollouts(rworld):
    """GRPO, K = 2 updates per rollout batch, β = 0: the loss is L_GRPO alone, and the second update of
    each batch (same rollouts, ratio against π_old) has a lower surrogate than the first."""
    over = (f"batch_size={N_RECORDS // 2}", "gdso.iterations=1", "gdso.updates_per_batch=2",
            "gdso.steps_per_iteration=null", "run.max_steps=4", "gdso.beta=0.0")  # fmt: skip
    m = _train(rworld, "grpo", rworld["root"] / "grpo", *over)
    rows = m["train"]
    assert all(r["loss"] == pytest.approx(r["pg_loss"], abs=1e-7) for r in rows)  # no direct losses
    for k in (0, 2):
        assert rows[k]["reward"] == rows[k + 1]["reward"]  # the same rollout batch
        assert rows[k + 1]["pg_loss"] < rows[k]["pg_loss"] - 1e-4, (
            rows[k]["pg_loss"],
            rows[k + 1]["pg_loss"],
        )


def test_grpo_step_uses_the_advantages_of_its_own_rollout_rewards(rworld, monkeypatch):
    """The advantages that reach Eq. 14 are those of the step's own rollout rewards, sign included:
    within each side's group an output rewarded above the group mean has a positive advantage."""
    import zr_diffusion.reward.gdso as gdso

    seen: dict[str, list] = {"rewards": [], "advantages": []}
    real_rewards, real_loss = gdso.group_rewards, gdso.gdso_loss

    def spy_rewards(*args, **kwargs):
        out = real_rewards(*args, **kwargs)
        seen["rewards"].append(out)
        return out

    def spy_loss(readout, rollout, advantages, *args, **kwargs):
        seen["advantages"].append(advantages)
        return real_loss(readout, rollout, advantages, *args, **kwargs)

    monkeypatch.setattr(gdso, "group_rewards", spy_rewards)
    monkeypatch.setattr(gdso, "gdso_loss", spy_loss)
    over = (f"batch_size={N_RECORDS // 2}", *GDSO_SCHEDULE, "run.max_steps=1", "gdso.group_size=4")
    _train(rworld, "grpo", rworld["root"] / "grpo-advantages", *over)
    (rewards,), (advantages,) = seen["rewards"], seen["advantages"]
    torch.testing.assert_close(advantages, rewards.advantages)
    centred = rewards.reward - rewards.reward.mean(-1, keepdim=True)  # [B, 2, G]
    assert (advantages * centred >= 0).all() and (advantages * centred).sum() > 0


def test_risd_step_loss_pairs_each_record_with_its_own_cached_target(rworld, gdso_teacher):
    """RISD from the GDSO teacher: step 1's loss is KL(q_T ‖ q_φ) with each record's OWN cached
    teacher target and the base student's logits; the loss falls overall and the student's HPA
    (one output token) rises to 1."""
    from zr_diffusion.reward.losses import risd_loss
    from zr_diffusion.reward.risd import teacher_targets
    from zr_diffusion.reward.scoring import student_score_logits
    from zr_diffusion.training import make_accelerator

    out = rworld["root"] / "risd"
    teacher = f"distill.teacher={gdso_teacher['model']}"
    cfg = _reward_cfg(rworld, "risd", out, teacher)
    base = _frozen(rworld["student"], cfg)
    hpa0 = _hpa(base, rworld, cfg, "student")

    m = _train(rworld, "risd", out, teacher, "run.max_steps=12")  # the targets' μ differ by ~1e-3
    recs = _step0_records(rworld, cfg)
    targets = teacher_targets(cfg, recs, make_accelerator(cfg.run))  # from the run's cache, in batch order
    assert targets.cached == len(recs)
    with torch.no_grad():
        expected = risd_loss(targets.probs, student_score_logits(base, recs))
    losses = [r["loss"] for r in m["train"]]
    assert losses[0] == pytest.approx(float(expected), abs=1e-6)
    assert losses[-1] < losses[0] / 2, losses
    assert hpa0 < 1.0 and m["eval"][-1]["hpa"] == 1.0, (hpa0, m["eval"], losses)


def test_opd_step_loss_reads_the_teacher_on_that_sequence_and_moves_towards_it(
    rworld, gdso_teacher, monkeypatch
):
    """OPD from the GDSO teacher. Step 1: the loss is Eq. 19 with A_t = log π_T − log π_old read on the
    SAME sampled sequence, and after the update the student's reverse-KL estimate on those sequences
    is lower. Over six steps the student's teacher-mode train-set HPA rises."""
    import zr_diffusion.reward.baselines.opd as opd
    from zr_diffusion.reward.losses import opd_advantages, opd_loss
    from zr_diffusion.reward.scoring import record_suffix_readout

    sampled: list[list] = []
    real = opd.sample_outputs

    def record_outputs(scorer, records, rollout, generator):
        outputs = real(scorer, records, rollout, generator)
        sampled.append(outputs)
        return outputs

    monkeypatch.setattr(opd, "sample_outputs", record_outputs)
    teacher_arg = f"distill.teacher={gdso_teacher['model']}"
    one = rworld["root"] / "opd-1"
    cfg = _reward_cfg(rworld, "opd", one, teacher_arg, "run.max_steps=1")
    (row,) = _train(rworld, "opd", one, teacher_arg, "run.max_steps=1")["train"]
    (outputs,) = sampled
    recs = _step0_records(rworld, cfg)
    teacher, base, tuned = (
        _frozen(p, cfg) for p in (gdso_teacher["model"], rworld["student"], one / "model")
    )
    suffixes = [out.token_ids for out in outputs]
    with torch.no_grad():
        t_read, s_read, n_read = (
            record_suffix_readout(s, recs, suffixes, mode="teacher") for s in (teacher, base, tuned)
        )
    mask = opd.sampled_mask(outputs, s_read.token_mask.shape[1])  # appended marker tokens are not in the loss
    adv = opd_advantages(t_read.token_logprobs, s_read.token_logprobs)
    assert row["loss"] == pytest.approx(float(opd_loss(adv, s_read.token_logprobs, mask)), abs=1e-5)

    def reverse_kl(read) -> float:  # mean over records of the per-token log π_φ − log π_T
        return float((((read.token_logprobs - t_read.token_logprobs) * mask).sum(-1) / mask.sum(-1)).mean())

    def gap(read) -> float:  # mean over records of the per-token (log π_φ − log π_T)²
        return float(
            (((read.token_logprobs - t_read.token_logprobs) ** 2 * mask).sum(-1) / mask.sum(-1)).mean()
        )

    assert row["reverse_kl"] == pytest.approx(reverse_kl(s_read), abs=1e-5)
    before, after = (float(opd_loss(adv, r.token_logprobs, mask)) for r in (s_read, n_read))
    assert after < before - 1e-4, f"the step's own objective rose on its batch: {before} -> {after}"
    assert gap(n_read) < gap(s_read), "the student's log-probs moved away from the teacher's on its samples"

    six = rworld["root"] / "opd-6"
    hpa0 = _hpa(base, rworld, cfg, "teacher")
    m = _train(rworld, "opd", six, teacher_arg)
    assert m["eval"][-1]["hpa"] > hpa0, (hpa0, m["eval"])


# ---- teacher-mode evaluation: μ is the mean over the G rollouts ----------------------------------------


class ForceSuffixes:
    """A logits processor that makes row r of a rollout batch write ``suffixes[r % G]`` token by token
    (rows are input-major, G samples each), so every rollout's text is known in advance."""

    def __init__(self, suffixes: list[list[int]]):
        self.suffixes = suffixes
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.prompt_length is None:
            self.prompt_length = input_ids.shape[1]
        pos = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        for r in range(input_ids.shape[0]):
            suffix = self.suffixes[r % len(self.suffixes)]
            forced[r, suffix[min(pos, len(suffix) - 1)]] = 0.0
        return forced


def test_teacher_mode_eval_mu_is_the_mean_over_rollouts_and_tokens_per_call_is_exact(
    rworld, steep_vlm, tmp_path, monkeypatch
):
    """``zr eval-reward mode=teacher teacher_samples=3`` with rollouts forced to three known texts of
    2, 3 and 4 words, each followed by the score marker the model writes itself: every record's μ is
    the mean of the three μ read after those texts, and tokens/call is (generated tokens + 1 score
    token) averaged over the calls."""
    from transformers import LogitsProcessorList

    import zr_diffusion.vlm.reasoning as reasoning
    from zr_diffusion.reward.scoring import record_suffix_readout
    from zr_diffusion.scores import expected_score, score_distribution

    cfg = _reward_cfg(rworld, "sft", tmp_path)
    scorer = _frozen(steep_vlm, cfg)
    words = scorer.tokenizer.encode(" the image is bright", add_special_tokens=False)
    suffixes = [words[: k + 2] + list(scorer.marker_ids) for k in range(3)]  # G = 3 known rollouts
    real = reasoning.generate_reasoning

    def forced(*args, **kwargs):
        return real(*args, logits_processor=LogitsProcessorList([ForceSuffixes(suffixes)]), **kwargs)

    monkeypatch.setattr(reasoning, "generate_reasoning", forced)
    records = rworld["records"][:4]
    data = rworld["train"].with_name("first4.jsonl")  # beside the images its rows name
    data.write_text("".join(rworld["train"].read_text().splitlines(keepends=True)[: len(records)]))
    out = tmp_path / "eval"
    argv = ["eval-reward", f"model={steep_vlm}", f"data={data}", f"output_dir={out}", "mode=teacher",
            "teacher_samples=3", "dimensions=[alignment]", "batch_size=2", "rollout.max_new_tokens=8"]  # fmt: skip
    assert main(argv) == 0

    bins = scorer.grid.values()
    predictions = {
        json.loads(line)["id"]: json.loads(line)["mu"] for line in (out / "predictions.jsonl").open()
    }
    for rec in records:
        with torch.no_grad():
            read = record_suffix_readout(scorer, [rec] * 3, suffixes, mode="teacher")
        mus = expected_score(score_distribution(read.score_logits).float(), bins)  # [G]
        assert float(mus.max() - mus.min()) > 1e-3  # the three rollouts score differently
        assert predictions[rec.id] == pytest.approx(float(mus.mean()), abs=1e-5), (rec.id, mus.tolist())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scoring_calls"] == 3 * len(records)
    expected_tokens = sum(len(s) + 1 for s in suffixes) / len(suffixes)  # every text + marker generated, + 1
    assert metrics["tokens_per_call"] == pytest.approx(expected_tokens, abs=1e-9)


# ---- in-training HPA on a hand-built pair set ----------------------------------------------------------


def test_eval_hpa_on_hand_built_pairs(monkeypatch):
    """eval_hpa with a score readout that puts all mass on a chosen bin, so every μ is known.

    Pairs (same prompt and dimension, different ŝ), ``w`` = higher ŝ:
      A/alignment: ŝ (1, 3, 5) with μ (2, 4, 3): (3>1: 4>2 ok), (5>1: 3>2 ok), (5>3: 3<4 wrong)
      A/realism:   ŝ (2, 4) with μ (1.5, 4.5): ok
      B/alignment: ŝ (2, 2, 4.5) with μ (3, 1, 3): the equal-ŝ pair is not a pair; (4.5 vs first 2:
                   μ tie, counts wrong), (4.5 vs second 2: 3>1 ok)
      B/aesthetics is not evaluated (dims = alignment, realism).
    HPA = 4 correct of 6 pairs; records = 8. (With ŝ_w and ŝ_l swapped it would be 1/6.)
    """
    import zr_diffusion.reward.scoring as scoring
    from zr_diffusion.data import ScoredRecord
    from zr_diffusion.scores import ScoreGrid

    grid = ScoreGrid()
    table = [  # id, prompt, dimension, ŝ, μ
        ("a1", "A", "alignment", 1.0, 2.0), ("a3", "A", "alignment", 3.0, 4.0), ("a5", "A", "alignment", 5.0, 3.0),
        ("r2", "A", "realism", 2.0, 1.5), ("r4", "A", "realism", 4.0, 4.5),
        ("b2", "B", "alignment", 2.0, 3.0), ("c2", "B", "alignment", 2.0, 1.0), ("b45", "B", "alignment", 4.5, 3.0),
        ("e1", "B", "aesthetics", 1.0, 5.0), ("e5", "B", "aesthetics", 5.0, 1.0),
    ]  # fmt: skip
    records = [ScoredRecord(i, p, Path(f"{i}.png"), d, (s,)) for i, p, d, s, _ in table]
    mu = {i: m for i, _, _, _, m in table}

    def one_bin_logits(scorer, chunk):  # [B, S]: 100 at the bin of the record's μ, 0 elsewhere
        logits = torch.zeros(len(chunk), grid.num_bins)
        for b, rec in enumerate(chunk):
            logits[b, grid.bin_index(mu[rec.id])] = 100.0
        return logits

    class Scorer:
        grid = ScoreGrid()

    monkeypatch.setattr(scoring, "student_score_logits", one_bin_logits)
    out = scoring.eval_hpa(Scorer(), records, ["alignment", "realism"], batch_size=3)
    assert out["records"] == 8 and out["pairs"] == 6
    assert out["hpa"] == pytest.approx(4 / 6, abs=1e-12)


# ---- re-noising ------------------------------------------------------------------------------------------


def _tiny_adapter(family: str):
    from zr_diffusion.pipelines.adapters import ADAPTERS
    from zr_diffusion.pipelines.tiny import build_tiny_t2i

    adapter = ADAPTERS[family](build_tiny_t2i(family))
    adapter.set_timesteps(4, 32, 32)
    return adapter


def _scheduler_noised(adapter, x0: torch.Tensor, t_index: int, noise: torch.Tensor) -> torch.Tensor:
    """x0 noised to step ``t_index`` by the pipeline's own scheduler."""
    t = adapter.timesteps[t_index : t_index + 1]
    if hasattr(adapter.scheduler, "add_noise"):  # DDPM-family: √ᾱ_t x0 + √(1−ᾱ_t) ε
        return adapter.scheduler.add_noise(x0, noise, t.long())
    return adapter.scheduler.scale_noise(x0, t, noise)  # flow matching: σ ε + (1 − σ) x0


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "zimage"])
def test_renoise_matches_the_schedulers_own_noising(family):
    adapter = _tiny_adapter(family)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    assert hasattr(adapter.scheduler, "add_noise") == (family in ("sd", "sdxl"))
    levels = []
    for i in range(4):
        got = adapter.renoise(x0, i, noise)
        torch.testing.assert_close(got, _scheduler_noised(adapter, x0, i, noise), rtol=1e-5, atol=1e-6)
        levels.append(float((got - x0).norm()))
    assert levels == sorted(levels, reverse=True)  # later steps are less noisy


@pytest.mark.parametrize("family", ["sd", "zimage"])
def test_draft_lv_copies_are_renoised_to_the_last_steps_level(family):
    """Each DRaFT-LV copy is the final sample noised to step T−1 by the scheduler (noise drawn after the
    initial latents from the same generator), then denoised by step T−1."""
    from zr_diffusion.pipelines.sampler import SamplerConfig, sample

    adapter = _tiny_adapter(family)
    prompts = ["a red cube", "a blue sky"]
    guidance = 5.0 if family == "sd" else 0.0
    config = SamplerConfig(num_steps=3, guidance_scale=guidance, height=32, width=32, draft_lv=2)
    with torch.no_grad():
        out = sample(adapter, prompts, config, seed=4)
        final = out.latents[:2]
        gen = torch.Generator().manual_seed(4)
        adapter.initial_latents(2, 32, 32, gen)  # the draws before the copies' noise
        cond = adapter.encode_prompts(prompts, None, guidance_scale=guidance)
        adapter.set_timesteps(3, 32, 32)
        for copy in out.latents[2:].split(2):
            noise = torch.randn(final.shape, generator=gen)
            noisy = _scheduler_noised(adapter, final, 2, noise)
            torch.testing.assert_close(
                copy, adapter.denoise(noisy, 2, cond).prev_latents, rtol=1e-4, atol=1e-5
            )
