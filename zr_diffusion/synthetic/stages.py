"""What the demo's stages share, in a module of its own: the stage cache (``done.json`` markers keyed
by configuration hashes) and the :class:`Context` every stage function receives. ``demo.py`` runs the
stages; the stage modules (``demo_world``, ``demo_reward``, ``demo_t2i``, ``report``) import only this.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
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


# --------------------------------------------------------------------------------------------------
# independent steps of a stage, side by side


@dataclass(frozen=True)
class Step:
    """One cached step of a stage (``Cache.run(name, ...)``) that may run beside the others.

    ``build(done)`` gets the summaries of the steps named in ``after`` and returns ``(key, fn, args)``:
    the cache key and a module-level function called as ``fn(ctx, folder, *args)`` (a worker process
    imports it by name)."""

    name: str
    build: Callable[[dict[str, dict]], tuple[Any, Callable[..., dict], tuple]]
    after: tuple[str, ...] = ()


def _step_worker(ctx: Context, name: str, key: Any, fn: Callable[..., dict], args: tuple, log: str) -> dict:
    """A step in a fresh worker process: one torch thread, console output to ``log``."""
    import contextlib

    import torch

    torch.set_num_threads(1)
    with open(log, "w") as handle, contextlib.redirect_stdout(handle), contextlib.redirect_stderr(handle):
        return ctx.cache.run(name, key, lambda folder: fn(ctx, folder, *args))


def run_steps(
    ctx: Context,
    steps: Sequence[Step],
    workers: int,
    on_done: Callable[[str, dict], None] | None = None,
) -> dict[str, dict]:
    """Run (or reuse) ``steps``; returns ``{name: summary}``. ``workers <= 1``: one after another, in
    this process. Otherwise up to ``workers`` steps at once, each in a fresh process (spawned, one torch
    thread, output in ``<root>/<name>.log``): whenever a worker is free, the first step in the order
    given whose ``after`` steps are done. A step's result does not depend on ``workers`` beyond the torch thread count."""
    done: dict[str, dict] = {}
    names = {s.name for s in steps}
    for step in steps:
        missing = [a for a in step.after if a not in names]
        if missing:
            raise ValueError(f"step {step.name} comes after {missing}, which are not steps of this stage")

    def finish(name: str, summary: dict) -> None:
        done[name] = summary
        if on_done is not None:
            on_done(name, summary)

    if workers <= 1:
        for step in steps:
            key, fn, args = step.build(done)
            finish(
                step.name,
                ctx.cache.run(step.name, key, lambda folder, fn=fn, args=args: fn(ctx, folder, *args)),
            )
        return done

    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    waiting = list(steps)
    running: dict[Any, str] = {}
    light = Context(ctx.cfg, Cache(ctx.cache.root), ctx.root, ctx.results)  # what a worker gets (pickled)
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # read by the spawned workers at start-up
    try:
        with ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1
        ) as pool:
            while waiting or running:
                while len(running) < workers and (
                    ready := [s for s in waiting if all(a in done for a in s.after)]
                ):
                    step = ready[0]
                    waiting.remove(step)
                    key, fn, args = step.build(done)
                    marker = ctx.cache.marker(step.name)
                    if marker is not None and marker.get("hash") == config_hash(key):
                        finish(
                            step.name,
                            ctx.cache.run(
                                step.name, key, lambda folder, fn=fn, args=args: fn(ctx, folder, *args)
                            ),
                        )
                        continue
                    log = ctx.root / f"{step.name}.log"
                    log.parent.mkdir(parents=True, exist_ok=True)
                    ctx.cache.log(f"  {step.name}: started (log {log})")
                    running[pool.submit(_step_worker, light, step.name, key, fn, args, str(log))] = step.name
                if not running:
                    if waiting:
                        raise RuntimeError(
                            f"steps {[s.name for s in waiting]} wait on steps that never finish"
                        )
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    try:
                        summary = future.result()
                    except Exception as err:
                        raise RuntimeError(f"{name} failed: {err} (see {ctx.root / f'{name}.log'})") from err
                    ctx.cache.cached[name] = False
                    finish(name, summary)
    finally:
        for k, v in previous.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return done
