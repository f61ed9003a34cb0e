"""rank:k (RLKD) against a slow reference, plus the soft rank's own properties."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr_cli.losses import Rows, build_loss
from mgsr_cli.losses.ranking import RankLoss, soft_rank_sigmoid, union_top_k

# ---- reference: python loops over one row at a time


def probabilities(logits: list[float]) -> list[float]:
    top = max(logits)
    weights = [math.exp(value - top) for value in logits]
    total = sum(weights)
    return [weight / total for weight in weights]


def ranked_values(logits: list[float], rank_on: str) -> list[float]:
    if rank_on == "logits":
        return logits
    probs = probabilities(logits)
    return probs if rank_on == "probs" else [math.log(prob) for prob in probs]


def reference_soft_ranks(values: list[float], temperature: float) -> list[float]:
    return [
        1 + sum(1 / (1 + math.exp(-(v_i - v_j) / temperature)) for j, v_j in enumerate(values) if j != i)
        for i, v_i in enumerate(values)
    ]


def pearson(first: list[float], second: list[float]) -> float:
    first_mean, second_mean = sum(first) / len(first), sum(second) / len(second)
    covariance = sum((a - first_mean) * (b - second_mean) for a, b in zip(first, second))
    first_spread = sum((a - first_mean) ** 2 for a in first)
    second_spread = sum((b - second_mean) ** 2 for b in second)
    return covariance / math.sqrt(first_spread * second_spread)


def reference_rank_loss(teacher: list[float], student: list[float], k: int, rank_on: str, temperature: float) -> float:
    def top(row: list[float]) -> list[int]:
        return sorted(range(len(row)), key=lambda index: -row[index])[:k]

    teacher_top = top(teacher)
    candidates = teacher_top + [index for index in top(student) if index not in teacher_top]
    teacher_values, student_values = ranked_values(teacher, rank_on), ranked_values(student, rank_on)
    teacher_ranks = reference_soft_ranks([teacher_values[index] for index in candidates], temperature)
    student_ranks = reference_soft_ranks([student_values[index] for index in candidates], temperature)
    return 1 - pearson(teacher_ranks, student_ranks)


def random_logits(rows: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = 2 * torch.randn(rows, vocab, dtype=torch.float64, generator=generator)
    teacher = 2 * torch.randn(rows, vocab, dtype=torch.float64, generator=generator)
    return student, teacher


def rank_values(term: RankLoss, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return term(Rows(student, teacher)).values


# today's first variant: pairwise-sigmoid ranks over a per-row union
PAIRWISE = {"rank_method": "sigmoid", "rank_union": "row"}

CASES = [(6, 7, 3, "logprobs", 1.0), (5, 7, 2, "probs", 0.05), (4, 7, 3, "logits", 0.3), (2, 50257, 5, "logprobs", 1.0)]


@pytest.mark.parametrize("rows, vocab, k, rank_on, temperature", CASES)
def test_rank_matches_reference(rows, vocab, k, rank_on, temperature):
    student, teacher = random_logits(rows, vocab, seed=vocab + k)
    term = RankLoss(k, rank_on=rank_on, rank_temperature=temperature, **PAIRWISE)
    expected = [
        reference_rank_loss(teacher[row].tolist(), student[row].tolist(), k, rank_on, temperature) for row in range(rows)
    ]
    torch.testing.assert_close(rank_values(term, student, teacher), torch.tensor(expected, dtype=torch.float64))


def test_rank_through_build_loss_with_mask():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(2, 4, 9, dtype=torch.float64, generator=generator)
    teacher = torch.randn(2, 4, 9, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, True, False, True], [False, True, True, False]])
    output = build_loss("rank:3", rank_temperature=0.5, **PAIRWISE)(student, teacher, mask)
    expected = [
        reference_rank_loss(teacher[b, t].tolist(), student[b, t].tolist(), 3, "logprobs", 0.5)
        for b, t in mask.nonzero().tolist()
    ]
    torch.testing.assert_close(output.per_token[mask], torch.tensor(expected, dtype=torch.float64))


def test_union_is_per_row():
    """Two rows with different top-k sets: each row keeps its own union, and the batched
    result equals scoring each row alone."""
    teacher = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0, 4.0, 3.0]], dtype=torch.float64)
    student = torch.tensor([[5.0, 0.0, 0.0, 4.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0, 4.0, 3.0]], dtype=torch.float64)
    indices, valid = union_top_k(teacher, student, k=3)
    assert valid.sum(dim=-1).tolist() == [5, 3]
    assert set(indices[0][valid[0]].tolist()) == {0, 1, 2, 3, 4}
    assert set(indices[1][valid[1]].tolist()) == {3, 4, 5}
    term = RankLoss(3, **PAIRWISE)
    together = rank_values(term, student, teacher)
    alone = torch.cat([rank_values(term, student[row : row + 1], teacher[row : row + 1]) for row in range(2)])
    torch.testing.assert_close(together, alone)
    assert together[1].abs() < 1e-12 and together[0] > 0.05


def test_soft_rank_tends_to_hard_rank():
    values = torch.tensor([[0.3, -1.2, 2.5, 0.9, 0.1]], dtype=torch.float64)
    valid = torch.ones_like(values, dtype=torch.bool)
    hard = torch.tensor([[3.0, 1.0, 5.0, 4.0, 2.0]], dtype=torch.float64)
    errors = [(soft_rank_sigmoid(values, valid, temperature) - hard).abs().max().item() for temperature in (1.0, 0.1, 0.01, 1e-4)]
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-12
    valid[0, 2] = False  # an invalid entry is ignored and ranked 0
    torch.testing.assert_close(soft_rank_sigmoid(values, valid, 1e-4), torch.tensor([[3.0, 1.0, 0.0, 4.0, 2.0]], dtype=torch.float64))


VARIANTS = [pytest.param({}, id="official"), pytest.param(PAIRWISE, id="pairwise")]


@pytest.mark.parametrize("variant", VARIANTS)
def test_zero_for_identical_orderings(variant):
    student, teacher = random_logits(4, 30, seed=5)
    assert rank_values(RankLoss(5, **variant), teacher, teacher).abs().max() < 1e-12
    monotone = 3 * teacher + 1  # same ordering, different gaps: soft ranks agree as temperature -> 0
    near_hard = RankLoss(5, rank_on="logits", rank_temperature=1e-3, **variant)
    assert rank_values(near_hard, monotone, teacher).abs().max() < 1e-9
    assert rank_values(RankLoss(5, **variant), student, teacher).min() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_and_logprobs_rank_identically(variant):
    student, teacher = random_logits(5, 40, seed=7)
    torch.testing.assert_close(
        rank_values(RankLoss(4, rank_on="logits", **variant), student, teacher),
        rank_values(RankLoss(4, rank_on="logprobs", **variant), student, teacher),
    )


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank_on, temperature", [("logprobs", 1.0), ("probs", 0.05), ("logits", 0.3)])
def test_gradcheck(rank_on, temperature, variant):
    student, teacher = random_logits(3, 7, seed=11)
    term = RankLoss(3, rank_on=rank_on, rank_temperature=temperature, **variant)
    assert torch.autograd.gradcheck(lambda logits: rank_values(term, logits, teacher), (student.requires_grad_(True),))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("rank_on", ["logprobs", "probs"])
def test_masked_vocabulary_is_skipped(rank_on, variant):
    student, teacher = random_logits(3, 8, seed=13)
    student[:, 5:] = -math.inf
    teacher[:, 5:] = -math.inf
    student.requires_grad_(True)
    values = rank_values(RankLoss(5, rank_on=rank_on, rank_temperature=0.5, **variant), student, teacher)
    values.sum().backward()
    assert torch.isfinite(values).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("variant", VARIANTS)
def test_k_larger_than_vocabulary_and_single_candidate(variant):
    student, teacher = random_logits(2, 4, seed=17)
    assert torch.isfinite(rank_values(RankLoss(10, **variant), student, teacher)).all()
    same_top = torch.tensor([[3.0, 0.0, 1.0]], dtype=torch.float64)
    assert rank_values(RankLoss(1, **variant), same_top, same_top).item() == 0.0  # one candidate: nothing to rank


@pytest.mark.parametrize(
    "options", [{"k": 0}, {"rank_on": "ranks"}, {"rank_temperature": 0.0}, {"rank_method": "kl"}, {"rank_union": "all"}]
)
def test_invalid_options(options):
    with pytest.raises(ValueError):
        RankLoss(**options)
