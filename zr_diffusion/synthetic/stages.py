"""What the demo's stages share, in a module of its own: the stage cache (``done.json`` markers keyed
by configuration hashes) and the :class:`Context` every stage function receives. ``demo.py`` runs the
stages; the stage modules (``demo_world``, ``demo_reward``, ``demo_t2i``, ``report``) import only this.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:
    from zr_diffusion.synthetic.demo import DemoConfig


# --------------------------------------------------------------------------------------------------
# run configs


def deep_merge(base: dict, extra: dict) -> dict:
    """``extra`` merged into ``base``, nested dicts merged key by key (a run's settings over the shared ones)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def write_run_config(cls, data: dict, path: Path):
    """Write ``data`` as YAML and load it back through ``load_config`` (the recipe's own validation)."""
    from zr_diffusion.config import load_config
    from zr_diffusion.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return load_config(cls, path)


# --------------------------------------------------------------------------------------------------
# stage cache


def config_hash(*parts: Any) -> str:
    from zr_diffusion.config import to_dict
    from zr_diffusion.reward.loop import fingerprint

    return fingerprint(*[to_dict(p) for p in parts])


class Cache:
    """``done.json`` markers: a step is finished when its folder holds a marker with its hash.

    ``run(name, key, fn)`` returns the step's summary: from the marker when the hash matches
    (printing that it is cached), otherwise after clearing the folder and calling ``fn(folder)``,
    which returns the summary; the marker is written last, atomically.
    """

    def __init__(self, root: Path, log: Callable[[str], None] = print):
        self.root = root
        self.log = log
        self.cached: dict[str, bool] = {}

    def marker(self, name: str) -> dict | None:
        path = self.root / name / "done.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def run(self, name: str, key: Any, fn: Callable[[Path], dict], stage: bool = False) -> dict:
        from zr_diffusion.io import atomic_write_json

        folder = self.root / name
        digest = config_hash(key)
        done = self.marker(name)
        what = "stage" if stage else " "
        if done is not None and done.get("hash") == digest:
            self.cached[name] = True
            self.log(f"{what} {name}: cached ({folder})")
            return done["summary"] | {"hash": digest, "seconds": done["seconds"], "cached": True}
        if done is not None:
            self.log(f"{what} {name}: configuration changed, rebuilding")
        if not stage and folder.exists():
            shutil.rmtree(folder)  # a stage folder keeps its finished steps (they check their own hash)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "done.json").unlink(missing_ok=True)
        tic = time.perf_counter()
        summary = fn(folder)
        seconds = time.perf_counter() - tic
        atomic_write_json(
            folder / "done.json",
            {
                "name": name,
                "hash": digest,
                "seconds": seconds,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "summary": summary,
            },
        )
        self.cached[name] = False
        return summary | {"hash": digest, "seconds": seconds, "cached": False}


@dataclass
class Context:
    """What every stage gets: the config, the cache, the stage folders and the results so far."""

    cfg: DemoConfig
    cache: Cache
    root: Path
    results: dict[str, dict] = field(default_factory=dict)

    def dir(self, stage: str) -> Path:
        return self.root / stage
