import math

import pytest

from rloop_lightning.algorithms.metrics import (
    avg_at_n,
    distinct_count,
    mean_pass_at_k,
    ngram_similarity,
    pass_at_k,
)


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 1, 0.3),  # pass@1 = c/n
        (10, 2, 2, 17 / 45),  # 1 - C(8,2)/C(10,2) = 1 - 28/45
        (4, 3, 2, 1.0),  # n - c = 1 < k: every draw of 2 holds a correct one
        (5, 0, 3, 0.0),
        (5, 5, 1, 1.0),
    ],
)
def test_pass_at_k_exact(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_and_is_stable_for_large_n():
    for n, c, k in [(1000, 10, 100), (200, 1, 50), (64, 7, 16)]:
        exact = 1 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-9)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


def test_pass_at_k_rises_with_k():
    values = [pass_at_k(10, 2, k) for k in range(1, 11)]
    assert all(values[k] < values[k + 1] for k in range(8))  # strictly rising until it reaches 1
    assert values[-2:] == [1.0, 1.0]  # k = 9, 10 > n - c = 8


def test_pass_at_k_errors():
    for n, c, k in [(4, 1, 5), (4, 1, 0), (4, 5, 1), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_and_avg_at_n():
    # c=1: 0.5; c=2: 1 - C(2,2)/C(4,2) = 5/6 -> mean 2/3
    assert mean_pass_at_k([1, 2], n=4, k=2) == pytest.approx(2 / 3)
    # (1 + 2 + 4) / (3 * 4) = 7/12, and avg@n == mean pass@1
    assert avg_at_n([1, 2, 4], 4) == pytest.approx(7 / 12)
    assert mean_pass_at_k([1, 2, 4], n=4, k=1) == pytest.approx(7 / 12)
    with pytest.raises(ValueError):
        mean_pass_at_k([], 4, 1)
    with pytest.raises(ValueError):
        avg_at_n([5], 4)


def test_distinct_count():
    items = ["x = 2", " x = 2 ", "2", "x=2"]
    assert distinct_count(items) == 3
    assert distinct_count(items, normalize=None) == 4
    assert distinct_count([]) == 0


def test_ngram_similarity():
    # trigrams {abc, bcd} vs {abc, bce}: 1 shared of 3 -> 1/3
    assert ngram_similarity(["abcd", "abce"]) == pytest.approx(1 / 3)
    # pairs: 1/3, 0, 0 -> 1/9
    assert ngram_similarity(["abcd", "abce", "xyz"]) == pytest.approx(1 / 9)
    # bigrams {ab, bc} vs {ab, bd} -> 1/3
    assert ngram_similarity(["abc", "abd"], n=2) == pytest.approx(1 / 3)
    assert ngram_similarity(["same text", "same text"]) == 1.0
    assert ngram_similarity(["1", "1"]) == 1.0 and ngram_similarity(["1", "2"]) == 0.0  # shorter than n
    assert ngram_similarity(["only one"]) == 0.0 and ngram_similarity([]) == 0.0
