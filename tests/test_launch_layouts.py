"""Every shipped (recipe config, accelerate config) pair the README documents passes the batch-layout
check that the recipe runs at start-up, with the accelerate config's number of processes.

The pairs: each ``accelerate launch --config_file A -m zr_diffusion.cli CMD --config C`` line of the
README, and every shipped config without ``_tiny`` with ``configs/accelerate/ddp.yaml`` (the
README's "Real scale" section: "run them under accelerate launch").
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from zr_diffusion.config import load_config
from zr_diffusion.pipelines.config import FinetuneT2IConfig, SFTT2IConfig, micro_batch_size
from zr_diffusion.reward.config import TrainRewardConfig
from zr_diffusion.reward.loop import check_batch_layout

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = re.compile(r"accelerate launch --config_file (\S+) -m zr_diffusion\.cli (\S+) --config (\S+\.yaml)")
DDP = "configs/accelerate/ddp.yaml"


def _reward_layout(cfg: TrainRewardConfig, processes: int) -> None:
    check_batch_layout(cfg.batch_size, processes, cfg.run.grad_accum)  # reward.loop.run_training


def _t2i_layout(cfg: FinetuneT2IConfig | SFTT2IConfig, processes: int) -> None:
    micro_batch_size(cfg.batch_size, cfg.run.grad_accum, processes)  # finetune_t2i / train_t2i_sft


COMMANDS = {
    "train-reward": (TrainRewardConfig, _reward_layout),
    "finetune-t2i": (FinetuneT2IConfig, _t2i_layout),
    "train-t2i-sft": (SFTT2IConfig, _t2i_layout),
}


def _shipped() -> set[tuple[str, str, str]]:
    """(accelerate config, command, recipe config) of every shipped training config with ddp.yaml."""
    pairs = {
        (DDP, "train-reward", f"configs/reward/{p.name}") for p in (ROOT / "configs/reward").glob("*.yaml")
    }
    pairs |= {
        (DDP, "finetune-t2i", f"configs/t2i/{p.name}") for p in (ROOT / "configs/t2i").glob("*_zreward.yaml")
    }
    pairs.add((DDP, "train-t2i-sft", "configs/t2i/sft.yaml"))
    return {p for p in pairs if not p[2].endswith("_tiny.yaml")}


def _readme() -> set[tuple[str, str, str]]:
    return set(LAUNCH.findall((ROOT / "README.md").read_text()))


def test_the_readme_documents_launch_lines():
    assert (DDP, "finetune-t2i", "configs/t2i/zimage_zreward.yaml") in _readme()
    assert (DDP, "train-reward", "configs/reward/gdso.yaml") in _readme()
    assert len(_shipped()) == 11  # six reward methods, four *_zreward, sft


@pytest.mark.parametrize("launch, command, config", sorted(_readme() | _shipped()))
def test_shipped_config_splits_over_its_launch(launch, command, config):
    processes = yaml.safe_load((ROOT / launch).read_text())["num_processes"]
    cls, layout = COMMANDS[command]
    layout(load_config(cls, ROOT / config), processes)
