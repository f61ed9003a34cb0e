"""ROUGE-L: our bit-parallel LCS must give rouge-score's numbers exactly."""

from __future__ import annotations

import random

import pytest
from rouge_score import rouge_scorer

from mgsr_cli.metrics import corpus_rouge_l, lcs_length, mean_and_std, rouge_l, rouge_l_max

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the mat"),
    ("", "a reference with words"),
    ("a prediction with words", ""),
    ("", ""),
    ("Running runners ran quickly", "the runner runs quick"),
    ("identical text here", "identical text here"),
    ("completely different", "nothing shared at all"),
    ("repeat repeat repeat the the", "the repeat the repeat"),
    ("Numbers 1, 2 and 3!", "numbers: 3, 2, 1"),
    ("Ünïcode wörds and emoji 🤖 here", "unicode words and emoji here"),
]


def dynamic_programming_lcs(first: list[str], second: list[str]) -> int:
    table = [[0] * (len(second) + 1) for _ in range(len(first) + 1)]
    for i, a in enumerate(first, 1):
        for j, b in enumerate(second, 1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j], table[i][j - 1])
    return table[-1][-1]


@pytest.fixture(scope="module")
def scorer():
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@pytest.mark.parametrize("prediction, reference", PAIRS)
def test_rouge_l_equals_rouge_score(scorer, prediction, reference):
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)


def test_max_over_references_equals_best_rouge_score(scorer):
    prediction = "the quick brown fox jumps"
    references = ["a slow dog", "the quick fox jumped high", "brown foxes"]
    expected = max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in references)
    assert rouge_l_max(prediction, references) == pytest.approx(expected)
    assert rouge_l_max("", references) == 0.0
    assert rouge_l_max(prediction, []) == 0.0


def test_lcs_matches_dynamic_programming_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        alphabet = [str(i) for i in range(rng.randint(1, 6))]
        first = [rng.choice(alphabet) for _ in range(rng.randint(0, 80))]
        second = [rng.choice(alphabet) for _ in range(rng.randint(0, 80))]
        assert lcs_length(first, second) == dynamic_programming_lcs(first, second)


def test_corpus_score_is_mean_times_100_and_refuses_count_mismatch(scorer):
    predictions = ["the cat", "a dog barks"]
    references = [["the cat sat"], ["dogs bark", "a dog barked loudly"]]
    expected = 100 * sum(
        max(scorer.score(reference, prediction)["rougeL"].fmeasure for reference in refs)
        for prediction, refs in zip(predictions, references)
    ) / 2
    assert corpus_rouge_l(predictions, references) == pytest.approx(expected)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        corpus_rouge_l(predictions, references[:1])


def test_mean_and_std():
    assert mean_and_std([1.0, 3.0]) == pytest.approx((2.0, 2**0.5))
    assert mean_and_std([5.0]) == (5.0, 0.0)
