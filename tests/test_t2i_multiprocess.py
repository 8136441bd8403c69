"""``zr finetune-t2i`` and ``zr train-t2i-sft`` under ``accelerate launch`` with two CPU processes (gloo).

Each process takes its shard of the global batch and its own noise, so without the gradient
average the two LoRAs would drift apart; after two steps both ranks must hold the same weights, and
they must be the weights of the saved LoRA. Validation runs on rank 0 only and selects by the reward
with patience 1, so rank 0 alone decides whether to stop after step 1: both ranks must stop together
(else the next step's all-reduce would hang) and hold the same weights either way.

The logged metrics are the mean over processes of each process's micro-batch values: the first
step's loss, reward and μ (taken before any update, with the LoRA still zero) are recomputed here,
rank by rank, from the same shard and the same noise, and their mean must be what was logged (a sum
over processes would log twice that).

``configs/accelerate/cpu_2proc.yaml`` alone starts one process in accelerate 1.x (its MULTI_CPU
launcher expects mpirun); ``--multi_gpu`` makes accelerate use torch.distributed.run, which on a
machine without GPUs starts the processes on the CPU with the gloo backend.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from tests._launch import launch_two_processes
from zr_diffusion.config import load_config
from zr_diffusion.data import load_image, save_image
from zr_diffusion.pipelines.base import LORA_WEIGHT_NAME
from zr_diffusion.pipelines.config import FinetuneT2IConfig, SFTT2IConfig
from zr_diffusion.pipelines.prompts import load_prompts
from zr_diffusion.pipelines.reward_finetune import load_t2i_adapter, reward_loss
from zr_diffusion.pipelines.sft import denoising_loss, load_sft_examples
from zr_diffusion.pipelines.tiny import make_tiny_t2i
from zr_diffusion.training import batch_indices, shard, step_generator
from zr_diffusion.vlm.tiny import make_tiny_vlm

REPO = Path(__file__).resolve().parents[1]
RANKS = [SimpleNamespace(num_processes=2, process_index=r) for r in (0, 1)]  # what shard() reads


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    return make_tiny_t2i(tmp_path_factory.mktemp("zimage") / "zimage", "zimage")


def _first_step_reward_logs(cfg: FinetuneT2IConfig) -> dict[str, float]:
    """Step 1's logs recomputed rank by rank (LoRA still zero: the base pipeline), averaged."""
    adapter = load_t2i_adapter(cfg.pipeline, cfg.family, cfg.dtype, "cpu")
    reward = cfg.reward.build("cpu")
    prompts = load_prompts(cfg.prompts)
    batch = [prompts[i] for i in batch_indices(len(prompts), cfg.batch_size, cfg.run.seed, 0)]
    per_rank = []
    for acc in RANKS:
        generator = step_generator(cfg.run.seed, 0, acc.process_index)
        with torch.no_grad():
            terms = reward_loss(adapter, reward, shard(batch, acc), cfg.sampler, generator)
        per_rank.append({"loss": float(terms.loss), "reward": float(terms.reward.mean())})
        per_rank[-1] |= {f"mu/{d}": float(v) for d, v in zip(reward.dimensions, terms.mu.mean(0))}
    assert per_rank[0]["reward"] != pytest.approx(per_rank[1]["reward"])  # two different shards
    return {k: (per_rank[0][k] + per_rank[1][k]) / 2 for k in per_rank[0]}


def test_two_processes_hold_the_same_lora_and_log_the_mean(tmp_path, pipeline):
    reward = make_tiny_vlm(tmp_path / "reward", "qwen2_vl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sky\na green tree\na yellow sun\n")
    out = tmp_path / "run"
    config = REPO / "configs/t2i/zimage_zreward_tiny.yaml"
    overrides = [
        f"pipeline={pipeline}",
        f"reward.model={reward}",
        f"prompts={prompts}",
        f"run.output_dir={out}",
        *("batch_size=4", "run.max_steps=2", "sampler.num_steps=2", "validation.every=1"),
        *("validation.seeds=[0, 1]", "validation.select_by=reward", "validation.patience=1"),
        *("run.tensorboard=false", "run.progress=false", "run.device=cpu", "debug_rank_dumps=true"),
    ]
    run = launch_two_processes("finetune-t2i", "--config", str(config), *overrides, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    val = metrics["validation"]
    stopped = val[1]["reward"] <= val[0]["reward"]  # patience 1: no improvement at step 1 stops the run
    assert [e["step"] for e in metrics["train"]] == ([1] if stopped else [1, 2])
    assert (metrics["stopped_early"] or {}).get("step") == (1 if stopped else None)
    assert metrics["selection"]["step"] == max(val, key=lambda e: e["reward"])["step"]
    assert (out / "best" / LORA_WEIGHT_NAME).is_file()

    rank0, rank1 = (load_file(out / f"rank{r}.safetensors") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    for k in rank0:
        torch.testing.assert_close(rank1[k], rank0[k], rtol=0, atol=0)
    assert max(v.abs().max() for k, v in rank0.items() if "lora_B" in k) > 0  # the LoRA moved
    saved = load_file(out / "final" / LORA_WEIGHT_NAME)  # diffusers names: transformer.<module>.lora_A.weight
    assert {f"transformer.{k.replace('.default', '')}" for k in rank0} == set(saved)
    for k, v in rank0.items():
        torch.testing.assert_close(saved[f"transformer.{k.replace('.default', '')}"], v)

    logged = metrics["train"][0]
    expected = _first_step_reward_logs(load_config(FinetuneT2IConfig, config, overrides))
    assert {k: logged[k] for k in expected} == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert logged["reg"] == 0.0


def test_two_process_sft_logs_the_mean_loss(tmp_path, pipeline):
    lines = []
    for i, prompt in enumerate(["a red cube", "a blue sky", "a green tree", "a yellow sun"]):
        save_image(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)), tmp_path / f"{i}.png")
        lines.append(json.dumps({"prompt": prompt, "image": f"{i}.png"}) + "\n")
    records = tmp_path / "records.jsonl"
    records.write_text("".join(lines))
    out = tmp_path / "sft"
    config = REPO / "configs/t2i/sft_tiny.yaml"
    overrides = [
        f"pipeline={pipeline}",
        f"records={records}",
        "min_score=null",
        f"run.output_dir={out}",
        *("batch_size=4", "run.max_steps=1", "run.tensorboard=false", "run.progress=false", "run.device=cpu"),
    ]
    run = launch_two_processes("train-t2i-sft", "--config", str(config), *overrides, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    cfg = load_config(SFTT2IConfig, config, overrides)
    adapter = load_t2i_adapter(cfg.pipeline, cfg.family, cfg.dtype, "cpu")
    examples = load_sft_examples(cfg.records)
    batch = [examples[i] for i in batch_indices(len(examples), cfg.batch_size, cfg.run.seed, 0)]
    losses = []
    for acc in RANKS:
        local = shard(batch, acc)
        images = torch.stack([load_image(e.image, (cfg.height, cfg.width)) for e in local])
        generator = step_generator(cfg.run.seed, 0, acc.process_index)
        with torch.no_grad():
            losses.append(float(denoising_loss(adapter, images, [e.prompt for e in local], generator)))
    assert losses[0] != pytest.approx(losses[1])
    logged = json.loads((out / "metrics.json").read_text())["train"][0]["loss"]
    assert logged == pytest.approx(sum(losses) / 2, rel=1e-5)
