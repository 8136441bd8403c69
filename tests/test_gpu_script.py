"""benchmarks/gpu.sh in its tiny mode (``ZR_GPU_SH_TINY=1``): every step of the GPU check runs on CPU at
--size tiny, the plain loop and each option give the plain loop's gradients, and the verdict is printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_script_tiny_mode(tmp_path):
    env = dict(os.environ, ZR_GPU_SH_TINY="1", OUT_DIR=str(tmp_path), PYTHON=sys.executable)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh")], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "did not finish" not in out, out[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    labels = {r["label"] for r in rows}
    assert labels == {"sd15-512", "sd15-512-compile", "fit:tiny"}
    sd15 = {(r["setting"], r["grad"]): r for r in rows if r["label"] == "sd15-512"}
    assert {
        "plain",
        "call",
        "blocks",
        "none",
        "img-dec",
        "vlm-ckpt",
        "budget",
        "fast",
        "bf16-pre",
        "lean",
    } <= {s for s, _ in sd15}
    assert ("call", "full") in sd15 and ("blocks", "full") in sd15 and ("none", "full") not in sd15
    for (setting, grad), r in sd15.items():
        if setting == "budget":
            assert r["grad_delta"] is None  # the budget changes what is scored
        elif setting == "bf16-pre":
            assert 0 < r["grad_delta"] < 0.5  # a bfloat16 prefix changes the sample a little
        else:
            assert r["grad_delta"] < 1e-4, (setting, grad, r["grad_delta"])  # the plain loop's gradients
    assert {r["batch"] for r in rows if r["label"] == "fit:tiny"} == {1, 2}
    verdict = out.split("== verdict")[1]
    assert "TINY MODE" in verdict
    for config in ("sd15_zreward", "sdxl_zreward", "flux_zreward", "zimage_zreward"):
        lines = [line for line in verdict.splitlines() if line.strip().startswith(config)]
        assert len(lines) == 2 and all(line.split()[-2:] == ["yes", "yes"] for line in lines), verdict
