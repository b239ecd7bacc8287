"""Evaluation metrics: pass@k, avg@n and solution diversity.

* ``pass_at_k`` is the unbiased estimator of Chen et al. 2021 from ``n`` samples, ``c`` correct::

      pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)

  (the product form avoids huge binomials). ``avg@n`` is the mean accuracy ``c / n``.
* Diversity: ``distinct_count`` counts distinct (stripped) strings; ``ngram_similarity`` is the
  mean pairwise Jaccard similarity of **character** trigram sets (math answers and short
  derivations are too short for whitespace-token n-grams to be informative). A text shorter than
  ``n`` characters is its own single gram; two empty texts count as identical (similarity 1).

Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn from ``n`` (``c`` correct) is correct."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:
        return 1.0
    failure = 1.0
    for i in range(n - c + 1, n + 1):
        failure *= 1.0 - k / i
    return 1.0 - failure


def mean_pass_at_k(correct_counts: Sequence[int], n: int, k: int) -> float:
    """pass@k averaged over prompts, each with ``n`` samples of which ``correct_counts[j]`` correct."""
    if not correct_counts:
        raise ValueError("mean_pass_at_k of no prompts")
    return sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts)


def avg_at_n(correct_counts: Sequence[int], n: int) -> float:
    """Mean accuracy over prompts and their ``n`` samples (= mean pass@1)."""
    if not correct_counts:
        raise ValueError("avg_at_n of no prompts")
    if n < 1 or any(not 0 <= c <= n for c in correct_counts):
        raise ValueError(f"need n >= 1 and 0 <= c <= n for every count, got n={n}")
    return sum(correct_counts) / (n * len(correct_counts))


def distinct_count(items: Sequence[str], normalize: Callable[[str], str] | None = str.strip) -> int:
    """Number of distinct items after ``normalize`` (``None``: compare as given)."""
    return len({normalize(item) if normalize is not None else item for item in items})


def _char_ngrams(text: str, n: int) -> set[str]:
    if len(text) < n:
        return {text} if text else set()
    return {text[i : i + n] for i in range(len(text) - n + 1)}


def _jaccard(a: set[str], b: set[str]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else 1.0


def ngram_similarity(texts: Sequence[str], n: int = 3) -> float:
    """Mean pairwise Jaccard similarity of character n-gram sets; 0.0 for fewer than two texts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(texts) < 2:
        return 0.0
    grams = [_char_ngrams(text, n) for text in texts]
    pairs = list(combinations(grams, 2))
    return sum(_jaccard(a, b) for a, b in pairs) / len(pairs)
