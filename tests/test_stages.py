"""The demo's stage plumbing: cached steps run one after another or side by side in worker processes."""

from __future__ import annotations

import json
import os

import pytest

from zr_diffusion.synthetic.stages import Cache, Context, Step, run_steps


def _write(ctx: Context, folder, value: int, source: str | None) -> dict:
    """A step: reads the summary file of the step it comes after (if any), writes its own value."""
    before = json.loads((ctx.root / source / "done.json").read_text())["summary"]["value"] if source else 0
    print(f"step value {value}")
    (folder / "out.txt").write_text(str(before + value))
    return {"value": before + value, "pid": os.getpid()}


def _fail(ctx: Context, folder, message: str) -> dict:
    raise ValueError(message)


def _steps(offset: int = 0) -> list[Step]:
    return [
        Step("s/a", lambda done: ({"a": 1 + offset}, _write, (1 + offset, None))),
        Step("s/b", lambda done: ({"b": 10, "a": done["s/a"]["hash"]}, _write, (10, "s/a")), after=("s/a",)),
        Step("s/c", lambda done: ({"c": 100}, _write, (100, None))),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_steps_run_in_order_of_their_dependencies_and_are_cached(tmp_path, workers):
    said: list[str] = []
    ctx = Context(None, Cache(tmp_path, log=said.append), tmp_path)
    finished: list[str] = []
    done = run_steps(ctx, _steps(), workers, on_done=lambda name, summary: finished.append(name))
    assert {k: v["value"] for k, v in done.items()} == {"s/a": 1, "s/b": 11, "s/c": 100}
    assert finished.index("s/a") < finished.index("s/b")
    assert (tmp_path / "s/b/out.txt").read_text() == "11"
    pids = {v["pid"] for v in done.values()}
    if workers == 1:
        assert pids == {os.getpid()}
    else:  # each step in a fresh worker process, its console output in <root>/<name>.log
        assert os.getpid() not in pids and len(pids) == 3
        assert "step value 10" in (tmp_path / "s/b.log").read_text()
    # a second call reuses every marker; a changed key reruns that step (and the one that reads it)
    again = run_steps(ctx, _steps(), workers)
    assert all(v["cached"] for v in again.values())
    changed = run_steps(ctx, _steps(offset=1), workers)
    assert {k: v["cached"] for k, v in changed.items()} == {"s/a": False, "s/b": False, "s/c": True}
    assert changed["s/b"]["value"] == 12


def test_a_failed_step_names_its_log(tmp_path):
    ctx = Context(None, Cache(tmp_path, log=lambda s: None), tmp_path)
    steps = [Step("s/x", lambda done: ({"x": 1}, _fail, ("no good",)))]
    with pytest.raises(RuntimeError, match=r"s/x failed: no good \(see .*s/x\.log\)"):
        run_steps(ctx, steps, 2)
    with pytest.raises(ValueError, match="comes after"):
        run_steps(ctx, [Step("s/y", lambda done: ({}, _write, (1, None)), after=("s/z",))], 2)
