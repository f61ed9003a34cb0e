"""ROUGE-L as MiniLLM / DistiLLM / MGSR report it: rouge-score's tokenizer with Porter stemming,
F-measure of the longest common subsequence, max over references, x100 when aggregated.

The tokenisation is rouge-score's own (so scores match it exactly); the LCS is a bit-parallel
algorithm instead of rouge-score's O(n*m) Python table, which makes scoring thousands of
512-token predictions take seconds instead of minutes.
"""

from __future__ import annotations

import statistics
from functools import lru_cache


@lru_cache(maxsize=1)
def _tokenizer():
    from rouge_score.tokenizers import DefaultTokenizer

    return DefaultTokenizer(use_stemmer=True)


def rouge_tokens(text: str) -> list[str]:
    return _tokenizer().tokenize(text)


def lcs_length(first: list[str], second: list[str]) -> int:
    """Length of the longest common subsequence (Hyyrö's bit-vector algorithm).

    Bit i of `columns` is 0 where the LCS of first[: i + 1] with the prefix of `second`
    seen so far grows; the number of zero bits at the end is the LCS length.
    """
    if not first or not second:
        return 0
    match_masks: dict[str, int] = {}
    for index, token in enumerate(first):
        match_masks[token] = match_masks.get(token, 0) | (1 << index)
    all_ones = (1 << len(first)) - 1
    columns = all_ones
    for token in second:
        matches = match_masks.get(token, 0)
        columns = ((columns + (columns & matches)) | (columns & ~matches)) & all_ones
    return len(first) - bin(columns).count("1")


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1]; 0 when either side has no tokens (as rouge-score)."""
    predicted, target = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(target, predicted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(target)
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(prediction: str, references: list[str] | tuple[str, ...]) -> float:
    """The best ROUGE-L F over the references (0 when there are none)."""
    return max((rouge_l(prediction, reference) for reference in references), default=0.0)


def corpus_rouge_l(predictions: list[str], references: list[list[str]]) -> float:
    """Mean over examples of the max-over-references ROUGE-L F, x100."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("no predictions to score")
    return 100.0 * sum(rouge_l_max(p, r) for p, r in zip(predictions, references)) / len(predictions)


def mean_and_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
