"""Config loading: YAML + overrides, unknown keys and wrong types are errors listing what is valid."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from zr_diffusion.config import ConfigError, load_config, save_config


@dataclass
class Optim:
    lr: float = 1e-4
    steps: int = 10


@dataclass
class Demo:
    name: str = "x"
    method: Literal["a", "b"] = "a"
    optim: Optim = field(default_factory=Optim)
    dims: tuple[str, ...] = ("alignment",)
    weights: dict[str, float] = field(default_factory=dict)
    named: dict[str, Optim] = field(default_factory=dict)  # like validation.judges
    out: str | None = None


def test_yaml_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("name: y\noptim:\n  lr: 0.5\n")
    cfg = load_config(
        Demo, f, ["optim.steps=3", "dims=[realism, aesthetics]", "method=b", "weights.realism=2"]
    )
    assert cfg.name == "y" and cfg.optim.lr == 0.5 and cfg.optim.steps == 3
    assert cfg.dims == ("realism", "aesthetics") and cfg.method == "b" and cfg.weights == {"realism": 2.0}
    save_config(cfg, tmp_path / "saved.yaml")
    assert load_config(Demo, tmp_path / "saved.yaml") == cfg


def test_overrides_reach_into_named_sections():
    cfg = load_config(Demo, None, ["named.fast.lr=0.5", "named.fast.steps=2", "named.slow.steps=7"])
    assert cfg.named == {"fast": Optim(lr=0.5, steps=2), "slow": Optim(steps=7)}
    with pytest.raises(
        ConfigError, match=r"unknown key 'named.fast.bogus' for Optim; valid keys: \['lr', 'steps'\]"
    ):
        load_config(Demo, None, ["named.fast.bogus=1"])
    with pytest.raises(ConfigError, match="not a section"):
        load_config(Demo, None, ["weights.realism.x=1"])


def test_int_is_accepted_for_float():
    assert load_config(Demo, None, ["optim.lr=1"]).optim.lr == 1.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown key 'optim.lrr'.*valid keys: \['lr', 'steps'\]"),
        ("optim.steps=1.5", "optim.steps: expected an integer"),
        ("method=c", r"not one of \['a', 'b'\]"),
        ("nonsense", "must look like key.sub=value"),
        ("name.sub=1", "not a section"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Demo, None, [override])


def test_bad_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*optim.lr: expected a number, got 'fast'"):
        load_config(Demo, f)
    f.write_text("colour: red\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['colour'\]"):
        load_config(Demo, f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(Demo, tmp_path / "missing.yaml")
