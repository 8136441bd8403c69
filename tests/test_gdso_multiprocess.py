"""GDSO under ``accelerate launch`` with two CPU processes (gloo): each rank samples its own rollouts
(its shard of the pairs, its own seed), DDP averages the gradients, and both ranks end every step
with identical weights; under FSDP2 (``configs/accelerate/cpu_2proc_fsdp.yaml``) the sharded run
takes the same steps and checkpoints whole tensors."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tests._launch import launch_two_processes
from tests.test_fsdp_multiprocess import adapter_weights, assert_same_run

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_end_each_step_with_identical_weights_and_fsdp_takes_the_same_steps(tmp_path):
    """FSDP: rollouts (``generate`` with synced_gpus), π_ref swapped into the shards, the vision pass
    outside the root's forward and the chunked LM head give the DDP run's weights and losses."""
    from tests.test_gdso import write_pair_records
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    model = make_tiny_vlm(tmp_path / "model", "qwen3_5")
    train = write_pair_records(tmp_path / "data")
    args = [
        *("train-reward", "--config", str(ROOT / "configs/reward/gdso_tiny.yaml")),
        *(f"model={model}", f"data.train={train}", f"data.eval={train}"),
        *("gdso.iterations=1", "gdso.steps_per_iteration=1", "gdso.updates_per_batch=2", "run.max_steps=2"),
        "run.save_every=2",
    ]
    runs = {}
    for name, config in (("ddp", "cpu_2proc.yaml"), ("fsdp", "cpu_2proc_fsdp.yaml")):
        runs[name] = tmp_path / name
        proc = launch_two_processes(*args, f"run.output_dir={runs[name]}", config=config)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        metrics = json.loads((runs[name] / "metrics.json").read_text())
        assert metrics["processes"] == 2 and metrics["steps"] == 2 and metrics["fsdp"] == (name == "fsdp")
        assert all(abs(r["loss"]) < float("inf") for r in metrics["train"])
        if name == "ddp":
            a, b = metrics["rank_weight_checksums"]
            assert a == b  # DDP kept the ranks' trainable weights identical
    assert_same_run(runs["fsdp"], runs["ddp"])  # and trained: some lora_B moved off zero

    # the FSDP checkpoint's trainable state is whole (gathered from both ranks' shards)
    state = torch.load(
        runs["fsdp"] / "checkpoints" / "step-0000002" / "custom_checkpoint_1.pkl", weights_only=False
    )
    adapter = adapter_weights(runs["fsdp"])
    assert {k.replace(".default", "") for k in state["weights"]} == set(adapter)
    for name, value in state["weights"].items():
        torch.testing.assert_close(value, adapter[name.replace(".default", "")])
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert len(moments) == len(adapter)
    assert sorted(m.shape for m in moments) == sorted(v.shape for v in adapter.values())
