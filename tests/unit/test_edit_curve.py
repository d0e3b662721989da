"""The image-to-image strength curve of `bench/edit_score.py` (issue 33, item 8): the rates the
card shows at each strength, and the monotone-blend check that is one of its targets."""

from __future__ import annotations

import sys

from tests.stack import ROOT

sys.path.insert(0, str(ROOT / "bench"))

from edit_score import OTHER_PROMPT_STRENGTHS, EditScores, blend_is_monotone, other_prompt_curve


def scores_with(keep: list[int], follow: list[int], n: int = 4) -> EditScores:
    """Scores where, at the i-th strength, keep[i] of n scenes kept A and follow[i] followed B."""
    scores = EditScores()
    for s, k, f in zip(OTHER_PROMPT_STRENGTHS, keep, follow, strict=True):
        for j in range(n):
            scores.add(f"img2img_other_prompt_{s:g}_keep (reported)", j < k)
            scores.add(f"img2img_other_prompt_{s:g}_follow (reported)", j < f)
    return scores


def test_the_curve_reads_each_strengths_rates() -> None:
    scores = scores_with([4, 4, 3, 2, 1, 0], [0, 0, 1, 2, 3, 4])
    assert other_prompt_curve(scores) == [
        (0.2, 1.0, 0.0), (0.3, 1.0, 0.0), (0.4, 0.75, 0.25),
        (0.6, 0.5, 0.5), (0.8, 0.25, 0.75), (1.0, 0.0, 1.0),
    ]  # fmt: skip
    assert blend_is_monotone(scores)


def test_a_blend_that_turns_back_is_not_monotone() -> None:
    assert blend_is_monotone(scores_with([4, 3, 3, 2, 0, 0], [0, 0, 1, 1, 4, 4]))
    assert not blend_is_monotone(scores_with([3, 4, 3, 2, 0, 0], [0, 0, 1, 1, 4, 4]))
    assert not blend_is_monotone(scores_with([4, 3, 3, 2, 0, 0], [0, 1, 0, 1, 4, 4]))
