"""The compute a training run has spent: process CPU seconds and wall seconds, carried over resumes.

The reward loop logs :meth:`RunClock.elapsed` in every ``metrics.json`` train and eval row and stores it
in each checkpoint's ``trainer_state.json``; a resumed run starts from the stored values, so the count
covers the whole run. Training and in-loop evaluation are counted apart (``cpu_seconds`` excludes the
evaluations, ``eval_cpu_seconds`` holds them): methods whose evaluations are costlier (teacher-mode
reasoning) are not charged for them in a budget comparison. CPU time is ``time.process_time()`` of
this process (all its threads); under several processes each counts its own.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

KEYS = ("cpu_seconds", "wall_seconds", "eval_cpu_seconds", "eval_wall_seconds")


class RunClock:
    """Seconds spent since the run started, summed over resumes.

    ``state``: the values a checkpoint stored (``trainer_state.json``), or nothing for a fresh run.
    ``cpu``/``wall``: the time sources (injectable for tests).
    """

    def __init__(
        self,
        state: Mapping | None = None,
        cpu: Callable[[], float] = time.process_time,
        wall: Callable[[], float] = time.perf_counter,
    ) -> None:
        state = dict(state or {})
        for key in KEYS:
            value = state.get(key, 0.0)
            if not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"checkpoint trainer_state {key}={value!r}: expected seconds >= 0")
        self._cpu, self._wall = cpu, wall
        self._base = {k: float(state.get(k, 0.0)) for k in KEYS}
        self._eval = {"cpu": 0.0, "wall": 0.0}  # this process's evaluations
        self._cpu0, self._wall0 = cpu(), wall()
        self._eval_start: tuple[float, float] | None = None

    def start_eval(self) -> None:
        if self._eval_start is not None:
            raise RuntimeError("RunClock.start_eval: an evaluation is already being timed")
        self._eval_start = (self._cpu(), self._wall())

    def stop_eval(self) -> None:
        if self._eval_start is None:
            raise RuntimeError("RunClock.stop_eval: no evaluation is being timed (call start_eval first)")
        cpu0, wall0 = self._eval_start
        self._eval["cpu"] += self._cpu() - cpu0
        self._eval["wall"] += self._wall() - wall0
        self._eval_start = None

    def elapsed(self) -> dict[str, float]:
        """``cpu_seconds``/``wall_seconds`` of training (evaluations excluded) and of the evaluations."""
        cpu = self._cpu() - self._cpu0  # this process, evaluations included
        wall = self._wall() - self._wall0
        return {
            "cpu_seconds": self._base["cpu_seconds"] + cpu - self._eval["cpu"],
            "wall_seconds": self._base["wall_seconds"] + wall - self._eval["wall"],
            "eval_cpu_seconds": self._base["eval_cpu_seconds"] + self._eval["cpu"],
            "eval_wall_seconds": self._base["eval_wall_seconds"] + self._eval["wall"],
        }
