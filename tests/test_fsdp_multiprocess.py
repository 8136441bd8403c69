"""The reward recipes under FSDP2 (``fully_shard``) on two CPU processes (gloo), launched with
``configs/accelerate/cpu_2proc_fsdp.yaml``: the sharded student (RISD) takes the one-process steps,
also across a resume. The sharded teacher (GDSO) is tested against DDP in test_gdso_multiprocess.py."""

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
FSDP = "cpu_2proc_fsdp.yaml"


def adapter_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "adapter" / "adapter_model.safetensors"))


def assert_same_run(a: Path, b: Path) -> None:
    wa, wb = adapter_weights(a), adapter_weights(b)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-6)
    assert any(v.abs().max() > 0 for k, v in wa.items() if "lora_B" in k)  # trained
    la = [r["loss"] for r in json.loads((a / "metrics.json").read_text())["train"]]
    lb = [r["loss"] for r in json.loads((b / "metrics.json").read_text())["train"]]
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)


def test_risd_fsdp_two_processes_resumed_equal_one_process(tmp_path):
    """Two sharded steps, a checkpoint, a resumed run to step 4 (weights and Adam state restored from
    whole tensors into the shards): the same weights and losses as one process running 4 steps."""
    train, evaluation = write_tiny_records(tmp_path / "data", per_prompt=2, eval_per_prompt=2)
    common = [
        *("--config", str(ROOT / "configs" / "reward" / "risd_tiny.yaml")),
        f"model={tiny_vlm_dir('qwen2_vl')}",
        f"distill.teacher={tiny_vlm_dir('qwen2_vl', seed=1)}",
        f"distill.cache_dir={tmp_path / 'teacher_cache'}",
        *(f"data.train={train}", f"data.eval={evaluation}", "batch_size=4", "run.save_every=2"),
        *("run.eval_every=0", "run.tensorboard=false", "run.progress=false"),
        *("rollout.max_new_tokens=4", "distill.teacher_rollouts=1"),
    ]
    two = tmp_path / "two"
    for steps, resume in ((2, "false"), (4, "true")):
        proc = launch_two_processes(
            "train-reward", *common, f"run.output_dir={two}", f"run.max_steps={steps}", f"resume={resume}",
            config=FSDP,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "resumed from" in proc.stdout and json.loads((two / "metrics.json").read_text())["fsdp"] is True
    one = tmp_path / "one"
    torch.set_num_threads(1)
    assert main(["train-reward", *common, f"run.output_dir={one}", "run.max_steps=4"]) == 0  # same cache
    assert_same_run(two, one)
    assert [r["step"] for r in json.loads((two / "metrics.json").read_text())["train"]] == [1, 2, 3, 4]


class _Accelerator:
    """The attributes of an ``accelerate.Accelerator`` that the sharding helpers read."""

    def __init__(self, distributed_type: str, num_processes: int, fsdp_plugin=None):
        from types import SimpleNamespace

        self.distributed_type, self.num_processes = distributed_type, num_processes
        self.state = SimpleNamespace(fsdp_plugin=fsdp_plugin)


def test_fsdp_is_used_when_asked_on_gpus_or_cpus_and_version_1_is_refused(monkeypatch):
    import pytest
    from accelerate.utils import FullyShardedDataParallelPlugin

    from zr_diffusion.reward.sharding import fsdp_plugin, uses_fsdp

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert uses_fsdp(_Accelerator("DistributedType.FSDP", 2))
    assert not uses_fsdp(_Accelerator("DistributedType.MULTI_CPU", 2))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # accelerate launch with an FSDP config, on CPUs
    assert uses_fsdp(_Accelerator("DistributedType.MULTI_CPU", 2))
    assert not uses_fsdp(_Accelerator("DistributedType.NO", 1))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp_plugin(
            _Accelerator("DistributedType.FSDP", 2, FullyShardedDataParallelPlugin(fsdp_version=1)), "no"
        )
