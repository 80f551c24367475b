"""research.stats: the paired bootstrap interval and the verdicts it allows."""
import statistics

import pytest
import torch

from research.stats import Interval, paired_interval


def test_interval_agrees_with_the_normal_closed_form():
    g = torch.Generator().manual_seed(1)
    a = (torch.randn(400, generator=g) * 0.1 + 0.05).tolist()
    b = [0.0] * 400
    interval = paired_interval(a, b)
    half = 1.96 * statistics.stdev(a) / len(a) ** 0.5
    assert interval.mean == pytest.approx(statistics.mean(a))
    assert interval.low == pytest.approx(statistics.mean(a) - half, abs=0.1 * half)
    assert interval.high == pytest.approx(statistics.mean(a) + half, abs=0.1 * half)


def test_clusters_widen_the_interval_when_videos_of_a_combination_agree():
    # 12 combinations, each with one shared offset: 400 videos carry only 12 independent draws
    g = torch.Generator().manual_seed(2)
    offsets = torch.randn(12, generator=g) * 0.1
    clusters = [i % 12 for i in range(400)]
    a = [offsets[c].item() + 0.001 * torch.randn((), generator=g).item() for c in clusters]
    by_video = paired_interval(a, [0.0] * 400)
    by_combination = paired_interval(a, [0.0] * 400, clusters)
    assert by_combination.clusters == 12
    assert by_combination.high - by_combination.low > 2.5 * (by_video.high - by_video.low)


@pytest.mark.parametrize("low, high, verdict", [(-0.01, 0.01, "matches"), (0.001, 0.01, "matches, better"),
                                                 (0.03, 0.05, "better"), (-0.05, -0.03, "worse"),
                                                 (-0.03, 0.01, "inconclusive")])
def test_verdicts_follow_the_interval(low, high, verdict):
    assert Interval((low + high) / 2, low, high, 10, 10).verdict(margin=0.02) == verdict


def test_a_nan_score_has_no_interval():
    with pytest.raises(ValueError, match="not finite"):
        paired_interval([0.5, float("nan")], [0.5, 0.5])
