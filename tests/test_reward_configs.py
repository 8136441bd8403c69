"""Every shipped reward config loads into TrainRewardConfig (unknown keys and bad values are errors)."""

from pathlib import Path

import pytest

from zr_diffusion.config import load_config
from zr_diffusion.reward.config import METHODS, TrainRewardConfig
from zr_diffusion.reward.train import RECIPES

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "reward").glob("*.yaml"))


def test_the_folder_has_configs():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = load_config(TrainRewardConfig, path)
    assert cfg.method in METHODS and cfg.method in RECIPES
    assert path.stem.removesuffix("_tiny") == cfg.method, "a config file is named after its method"
    if path.stem.endswith("_tiny"):
        assert cfg.model.startswith("runs/tiny/"), "tiny configs run on models made by `zr make-tiny`"
    else:
        assert cfg.model.startswith("Qwen/Qwen3.5-"), "real-scale configs name the paper's backbones"
        assert cfg.lora.enabled and cfg.dtype == "bfloat16"


def test_every_method_has_a_recipe():
    assert set(RECIPES) == set(METHODS)
