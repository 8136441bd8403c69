"""``zr finetune-t2i`` under ``accelerate launch`` with two CPU processes (gloo).

Each process takes its shard of the global batch and its own noise, so without the gradient
average the two LoRAs would drift apart; after two steps both ranks must hold the same weights, and
they must be the weights of the saved LoRA. Validation runs on rank 0 only and selects by the reward
with patience 1, so rank 0 alone decides whether to stop after step 1: both ranks must stop together
(else the next step's all-reduce would hang) and hold the same weights either way.

``configs/accelerate/cpu_2proc.yaml`` alone starts one process in accelerate 1.x (its MULTI_CPU
launcher expects mpirun); ``--multi_gpu`` makes accelerate use torch.distributed.run, which on a
machine without GPUs starts the processes on the CPU with the gloo backend.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests._launch import launch_two_processes
from zr_diffusion.pipelines.base import LORA_WEIGHT_NAME
from zr_diffusion.pipelines.tiny import make_tiny_t2i
from zr_diffusion.vlm.tiny import make_tiny_vlm

REPO = Path(__file__).resolve().parents[1]


def test_two_processes_hold_the_same_lora_after_two_steps(tmp_path):
    pipeline = make_tiny_t2i(tmp_path / "zimage", "zimage")
    reward = make_tiny_vlm(tmp_path / "reward", "qwen2_vl")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na blue sky\na green tree\na yellow sun\n")
    out = tmp_path / "run"
    run = launch_two_processes(
        *("finetune-t2i", "--config", str(REPO / "configs/t2i/zimage_zreward_tiny.yaml")),
        f"pipeline={pipeline}",
        f"reward.model={reward}",
        f"prompts={prompts}",
        f"run.output_dir={out}",
        *("batch_size=4", "run.max_steps=2", "sampler.num_steps=2", "validation.every=1"),
        *("validation.seeds=[0, 1]", "validation.select_by=reward", "validation.patience=1"),
        *("run.tensorboard=false", "run.progress=false", "run.device=cpu", "debug_rank_dumps=true"),
        timeout=300,
    )
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
    saved = load_file(out / "lora" / LORA_WEIGHT_NAME)  # diffusers names: transformer.<module>.lora_A.weight
    assert {f"transformer.{k.replace('.default', '')}" for k in rank0} == set(saved)
    for k, v in rank0.items():
        torch.testing.assert_close(saved[f"transformer.{k.replace('.default', '')}"], v)
