"""Run a ``zr`` command under ``accelerate launch`` with two CPU processes (gloo), as a user would."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(
    *zr_args: str, timeout: int = 600, config: str = "cpu_2proc.yaml"
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/CONFIG -m zr_diffusion.cli ARGS``."""
    cmd = [
        *(sys.executable, "-m", "accelerate.commands.launch"),
        *("--config_file", str(ROOT / "configs/accelerate" / config)),
        *("--num_processes", "2", "--main_process_port", str(free_port())),
        *("-m", "zr_diffusion.cli", *zr_args),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
