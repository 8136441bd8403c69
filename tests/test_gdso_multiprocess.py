"""GDSO under ``accelerate launch`` with two CPU processes (gloo): each rank samples its own rollouts
(its shard of the pairs, its own seed), DDP averages the gradients, and both ranks end every step
with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_end_each_step_with_identical_weights(tmp_path):
    from tests.test_gdso import write_pair_records
    from zr_diffusion.vlm.tiny import make_tiny_vlm

    model = make_tiny_vlm(tmp_path / "model", "qwen3_5")
    train = write_pair_records(tmp_path / "data")
    out = tmp_path / "run"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        str(Path(sys.executable).parent / "accelerate"), "launch",
        "--config_file", str(ROOT / "configs/accelerate/cpu_2proc.yaml"),
        "--main_process_port", str(_free_port()),
        "-m", "zr_diffusion.cli", "train-reward",
        "--config", str(ROOT / "configs/reward/gdso_tiny.yaml"),
        f"model={model}", f"data.train={train}", f"data.eval={train}", f"run.output_dir={out}",
        "gdso.iterations=1", "gdso.steps_per_iteration=1", "gdso.updates_per_batch=2",
        "run.max_steps=2", "run.save_every=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 2
    a, b = metrics["rank_weight_checksums"]
    assert a == b  # DDP kept the ranks' trainable weights identical
    assert all(abs(r["loss"]) < float("inf") for r in metrics["train"])
    adapter = out / "model" / "adapter" / "adapter_model.safetensors"
    from safetensors.torch import load_file

    assert any(v.abs().max() > 0 for k, v in load_file(str(adapter)).items() if "lora_B" in k)  # trained
