"""GDSO under ``accelerate launch`` with two CPU processes (gloo): each rank samples its own rollouts
(its shard of the pairs, its own seed), DDP averages the gradients, and both ranks end every step
with identical weights."""

from __future__ import annotations

import json
from pathlib import Path

from tests._launch import launch_two_processes

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_end_each_step_with_identical_weights(tmp_path):
    from tests.test_gdso import write_pair_records
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    model = make_tiny_vlm(tmp_path / "model", "qwen3_5")
    train = write_pair_records(tmp_path / "data")
    out = tmp_path / "run"
    proc = launch_two_processes(
        "train-reward",
        "--config", str(ROOT / "configs/reward/gdso_tiny.yaml"),
        f"model={model}", f"data.train={train}", f"data.eval={train}", f"run.output_dir={out}",
        "gdso.iterations=1", "gdso.steps_per_iteration=1", "gdso.updates_per_batch=2",
        "run.max_steps=2", "run.save_every=0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    a, b = metrics["rank_weight_checksums"]
    assert a == b  # DDP kept the ranks' trainable weights identical
    assert all(abs(r["loss"]) < float("inf") for r in metrics["train"])
    adapter = out / "model" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    assert any(v.abs().max() > 0 for k, v in load_file(str(adapter)).items() if "lora_B" in k)  # trained
