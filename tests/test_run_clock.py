"""RunClock: the CPU and wall seconds a reward run logs, evaluation apart, continued over resumes."""

from __future__ import annotations

import pytest

from zr_diffusion.reward.clock import RunClock


class FakeTime:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_training_and_evaluation_seconds_are_counted_apart():
    cpu, wall = FakeTime(100.0), FakeTime(5000.0)
    clock = RunClock(cpu=cpu, wall=wall)
    cpu.t, wall.t = 103.0, 5004.0  # 3 CPU s / 4 wall s of training
    clock.start_eval()
    cpu.t, wall.t = 105.0, 5010.0  # 2 / 6 of evaluation
    clock.stop_eval()
    cpu.t, wall.t = 106.0, 5011.0  # 1 / 1 more training
    assert clock.elapsed() == {
        "cpu_seconds": 4.0,
        "wall_seconds": 5.0,
        "eval_cpu_seconds": 2.0,
        "eval_wall_seconds": 6.0,
    }


def test_a_resumed_clock_continues_from_the_checkpoint():
    stored = {"cpu_seconds": 4.0, "wall_seconds": 5.0, "eval_cpu_seconds": 2.0, "eval_wall_seconds": 6.0}
    cpu, wall = FakeTime(7.0), FakeTime(1.0)  # a new process: its own time origin
    clock = RunClock(stored, cpu=cpu, wall=wall)
    assert clock.elapsed() == stored
    cpu.t, wall.t = 8.5, 3.0
    clock.start_eval()
    cpu.t = 9.0
    clock.stop_eval()
    assert clock.elapsed() == {
        "cpu_seconds": 5.5,
        "wall_seconds": 7.0,
        "eval_cpu_seconds": 2.5,
        "eval_wall_seconds": 6.0,
    }


def test_bad_stored_seconds_and_unpaired_eval_calls_are_errors():
    with pytest.raises(ValueError, match="cpu_seconds=-1"):
        RunClock({"cpu_seconds": -1})
    clock = RunClock()
    with pytest.raises(RuntimeError, match="start_eval first"):
        clock.stop_eval()
    clock.start_eval()
    with pytest.raises(RuntimeError, match="already being timed"):
        clock.start_eval()
