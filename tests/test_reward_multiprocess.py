"""RISD under ``accelerate launch`` with two CPU processes (gloo): both ranks end with the same
weights, and the two-process step equals the one-process step on the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests._launch import launch_two_processes
from tests._vlm_fixtures import tiny_vlm_dir
from zr_diffusion.cli import main
from zr_diffusion.reward.tiny_data import write_tiny_records

ROOT = Path(__file__).resolve().parents[1]


def test_risd_two_processes_equal_one_process(tmp_path):
    train, evaluation = write_tiny_records(tmp_path / "data", per_prompt=2, eval_per_prompt=2)
    common = [
        "--config",
        str(ROOT / "configs" / "reward" / "risd_tiny.yaml"),
        f"model={tiny_vlm_dir('qwen2_vl')}",
        f"distill.teacher={tiny_vlm_dir('qwen2_vl', seed=1)}",
        f"distill.cache_dir={tmp_path / 'teacher_cache'}",
        f"data.train={train}",
        f"data.eval={evaluation}",
        "batch_size=4",
        "run.max_steps=2",
        "run.eval_every=0",
        "run.save_every=0",
        "run.tensorboard=false",
        "run.progress=false",
        "rollout.max_new_tokens=4",
        "distill.teacher_rollouts=1",
    ]
    two = tmp_path / "two"
    proc = launch_two_processes("train-reward", *common, f"run.output_dir={two}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "computing 12 with 1 rollout(s)" in proc.stdout  # the two ranks built the cache in shards
    metrics = json.loads((two / "metrics.json").read_text())
    assert metrics["processes"] == 2
    first, second = metrics["rank_weight_checksums"]
    assert first == second  # DDP: both ranks end every step with identical weights

    one = tmp_path / "one"
    torch.set_num_threads(1)
    assert main(["train-reward", *common, f"run.output_dir={one}"]) == 0  # reuses the same teacher cache
    a = load_file(str(two / "model" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one / "model" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    losses_two = [r["loss"] for r in metrics["train"]]
    losses_one = [r["loss"] for r in json.loads((one / "metrics.json").read_text())["train"]]
    torch.testing.assert_close(torch.tensor(losses_two), torch.tensor(losses_one), rtol=1e-5, atol=1e-6)
