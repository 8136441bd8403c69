"""Score math by hand-computed values (METHOD.md §1)."""

import pytest
import torch

from zr_diffusion.rubric import (
    DIMENSIONS,
    SCORE_MARKER,
    check_dimensions,
    student_instruction,
    teacher_instruction,
)
from zr_diffusion.scores import (
    OffGridScoreError,
    ScoreGrid,
    aggregate_annotators,
    expected_score,
    gather_score_logits,
    score_distribution,
)


def test_default_grid_is_nine_half_point_bins():
    grid = ScoreGrid()
    assert grid.bins == (1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0)
    assert grid.tokens == tuple("123456789")
    assert grid.range == 4.0


def test_custom_grid_and_token_count_mismatch():
    grid = ScoreGrid(s_min=0.0, s_max=1.0, step=0.25, tokens=("a", "b", "c", "d", "e"))
    assert grid.bins == (0.0, 0.25, 0.5, 0.75, 1.0)
    with pytest.raises(ValueError, match="9 bins .* 3 score tokens"):
        ScoreGrid(tokens=("1", "2", "3"))
    with pytest.raises(ValueError, match="whole number"):
        ScoreGrid(s_min=1.0, s_max=5.0, step=0.3)


def test_expected_score_by_hand():
    """q = (0.5 at 3.0, 0.25 at 4.0, 0.25 at 5.0): μ = 1.5 + 1.0 + 1.25 = 3.75."""
    grid = ScoreGrid()
    q = torch.zeros(9)
    q[4], q[6], q[8] = 0.5, 0.25, 0.25
    assert expected_score(q, grid.values()).item() == pytest.approx(3.75)


def test_distribution_from_logits_reads_only_score_tokens():
    """Logits [0, ln 3] on the two score tokens (ids 5, 2): q = (1/4, 3/4); other vocab entries ignored."""
    logits = torch.full((1, 8), 100.0)
    logits[0, 5], logits[0, 2] = 0.0, torch.log(torch.tensor(3.0))
    q = score_distribution(gather_score_logits(logits, [5, 2]))
    torch.testing.assert_close(q, torch.tensor([[0.25, 0.75]]))
    grid = ScoreGrid(s_min=1.0, s_max=2.0, step=1.0, tokens=("a", "b"))
    assert expected_score(q, grid.values()).item() == pytest.approx(1 * 0.25 + 2 * 0.75)


def test_aggregate_annotators_drop_and_mean():
    """[1.0, 3.0, 3.5, 5.0]: drop 1.0 and 5.0 -> mean(3.0, 3.5) = 3.25; two annotators: plain mean."""
    assert aggregate_annotators([3.5, 1.0, 5.0, 3.0]) == pytest.approx(3.25)
    assert aggregate_annotators([2.0, 3.0, 4.5]) == pytest.approx(3.0)
    assert aggregate_annotators([2.0, 3.0]) == pytest.approx(2.5)
    assert aggregate_annotators([4.0]) == 4.0
    with pytest.raises(ValueError, match="empty"):
        aggregate_annotators([])


def test_off_grid_scores_are_errors_naming_the_value():
    grid = ScoreGrid()
    assert grid.check(3.5) == 3.5
    assert grid.bin_index(5.0) == 8
    for bad in (3.2, 0.5, 5.5, float("nan"), "4"):
        with pytest.raises(OffGridScoreError, match="score"):
            grid.check(bad)
    with pytest.raises(OffGridScoreError, match="3.2"):
        grid.check(3.2)


def test_rubric_dimensions_and_templates():
    assert set(DIMENSIONS) == {"alignment", "realism", "aesthetics", "plausibility"}
    assert all(len(d.levels) == 5 for d in DIMENSIONS.values())
    grid = ScoreGrid()
    s = student_instruction("a red cube", "realism", grid)
    t = teacher_instruction("a red cube", "realism", grid)
    assert "a red cube" in s and "1=1" in s and "9=5" in s and SCORE_MARKER not in s
    assert SCORE_MARKER in t
    with pytest.raises(ValueError, match="valid dimensions"):
        check_dimensions(["beauty"])
