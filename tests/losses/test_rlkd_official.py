"""rank:k as the official RLKD code computes it (github.com/Pty72/RLKD, sft/kd_sft.py).

The official loss ranks gathered raw logits with torchsort's l2 `soft_rank`, takes the
Pearson correlation of the two rank vectors per row, and adds KL / 2; its candidates are
`torch.unique(cat(topk_t, topk_s), dim=-1)` over the [N, 2k] batch (all 2k slots per row unless
a column repeats in every row, see ranking.py). The references below
are slow and written out: the isotonic projection by enumerating every partition into
blocks, the unique columns by Python sets.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mgsr_cli.losses import Rows, build_loss
from mgsr_cli.losses.ranking import RankLoss, slot_top_k, soft_rank_l2

# ---- reference: brute force over one row at a time


def isotonic_nonincreasing(y: list[float]) -> list[float]:
    """argmin over v_1 >= ... >= v_n of ||v - y||^2: the best feasible vector of block means
    over all 2^(n-1) partitions into contiguous blocks (the optimum is one of them)."""
    n, best, best_cost = len(y), None, math.inf
    for cuts in itertools.product([False, True], repeat=n - 1):
        bounds = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n]
        v = []
        for a, b in zip(bounds, bounds[1:]):
            v += [sum(y[a:b]) / (b - a)] * (b - a)
        if all(v[i] >= v[i + 1] - 1e-12 for i in range(n - 1)):
            cost = sum((vi - yi) ** 2 for vi, yi in zip(v, y))
            if cost < best_cost:
                best, best_cost = v, cost
    return best


def reference_soft_rank(values: list[float], strength: float) -> list[float]:
    """torchsort's l2 soft_rank: project values / strength onto the permutahedron of 1..n."""
    n = len(values)
    order = sorted(range(n), key=lambda i: -values[i])
    z = [values[i] / strength for i in order]
    v = isotonic_nonincreasing([z_i - (n - r) for r, z_i in enumerate(z)])
    ranks = [0.0] * n
    for r, i in enumerate(order):
        ranks[i] = z[r] - v[r]
    return ranks


def pearson(first: list[float], second: list[float]) -> float:
    mean_first, mean_second = sum(first) / len(first), sum(second) / len(second)
    a = [x - mean_first for x in first]
    b = [y - mean_second for y in second]
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def top(row: list[float], k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda index: -row[index])[:k]


def reference_candidates(teacher: list[list[float]], student: list[list[float]], k: int) -> list[list[int]]:
    """Per row, the entries of the distinct columns of [teacher top-k, student top-k]."""
    matrix = [top(t, k) + top(s, k) for t, s in zip(teacher, student)]
    columns = {tuple(row[c] for row in matrix) for c in range(2 * k)}
    return [[column[r] for column in sorted(columns)] for r in range(len(matrix))]


def reference_official_rank(teacher: list[list[float]], student: list[list[float]], k: int, strength: float) -> list[float]:
    values = []
    for row, candidates in enumerate(reference_candidates(teacher, student, k)):
        teacher_ranks = reference_soft_rank([teacher[row][i] for i in candidates], strength)
        student_ranks = reference_soft_rank([student[row][i] for i in candidates], strength)
        values.append(1 - pearson(teacher_ranks, student_ranks))
    return values


def reference_kl(teacher: list[float], student: list[float]) -> float:
    def log_softmax(row):
        top_value = max(row)
        total = math.log(sum(math.exp(x - top_value) for x in row)) + top_value
        return [x - total for x in row]

    log_p, log_q = log_softmax(teacher), log_softmax(student)
    return sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))


def random_logits(rows: int, vocab: int, seed: int, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    student = scale * torch.randn(rows, vocab, dtype=torch.float64, generator=generator)
    teacher = scale * torch.randn(rows, vocab, dtype=torch.float64, generator=generator)
    return student, teacher


# ---- the soft rank


@pytest.mark.parametrize("strength", [0.1, 1.0, 10.0])
@pytest.mark.parametrize("width", [1, 2, 5, 9])
def test_soft_rank_matches_brute_force_projection(width, strength):
    values = torch.randn(6, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    values[0] = torch.arange(width, dtype=torch.float64)  # gaps of exactly 1: ties in the isotonic problem
    values[1, : width // 2] = 0.5  # tied values
    expected = [reference_soft_rank(row, strength) for row in values.tolist()]
    torch.testing.assert_close(soft_rank_l2(values, strength), torch.tensor(expected, dtype=torch.float64))


def test_torchsort_readme_examples():
    """The worked examples of torchsort's README: ranks, and a Spearman value with its gradient."""
    ranks = soft_rank_l2(torch.tensor([[8.0, 0.0, 5.0, 3.0, 2.0, 1.0, 6.0, 7.0, 9.0]]))
    torch.testing.assert_close(ranks, torch.tensor([[8.0, 1.0, 5.0, 4.0, 3.0, 2.0, 6.0, 7.0, 9.0]]))

    def spearman(pred, target):
        pred, target = soft_rank_l2(pred), soft_rank_l2(target)
        pred, target = pred - pred.mean(), target - target.mean()
        return (pred / pred.norm() * target / target.norm()).sum()

    pred = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], requires_grad=True)
    value = spearman(pred, torch.tensor([[5.0, 6.0, 7.0, 8.0, 7.0]]))
    (gradient,) = torch.autograd.grad(value, pred)
    torch.testing.assert_close(value, torch.tensor(0.8321), atol=1e-4, rtol=0)
    expected = torch.tensor([[-5.5470e-02, 0.0, 5.5470e-02, 1.1094e-01, -1.1094e-01]])
    torch.testing.assert_close(gradient, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("strength", [0.1, 1.0, 10.0])
def test_soft_rank_gradcheck(strength):
    values = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: soft_rank_l2(x, strength), (values,))
    valid = torch.rand(8, 10, generator=torch.Generator().manual_seed(2)) > 0.3
    assert torch.autograd.gradcheck(lambda x: soft_rank_l2(x, strength, valid).masked_fill(~valid, 0.0), (values,))


def test_invalid_entries_leave_the_others_ranked_among_themselves():
    values = torch.tensor([[0.3, -1.2, 2.5, 0.9, 0.1, -7.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False, True, True, False]])
    kept = values[valid].unsqueeze(0)
    ranks = soft_rank_l2(values, 1.0, valid)
    torch.testing.assert_close(ranks[valid].unsqueeze(0), soft_rank_l2(kept, 1.0) + 2)


# ---- the loss


def test_slots_are_the_official_candidates_unless_a_column_repeats_in_every_row():
    teacher = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 5.0, 4.0, 3.0]], dtype=torch.float64)
    student = torch.tensor([[5.0, 0.0, 0.0, 4.0, 3.0, 0.0], [0.0, 0.0, 0.0, 4.0, 5.0, 3.0]], dtype=torch.float64)
    indices, valid = slot_top_k(teacher, student, k=3)
    assert indices.shape == (2, 6) and valid.all()
    assert sorted(indices[1].tolist()) == [3, 3, 4, 4, 5, 5]  # both top-3 lists: each token twice
    official = reference_candidates(teacher.tolist(), student.tolist(), 3)
    assert [sorted(row) for row in indices.tolist()] == [sorted(row) for row in official]
    # the documented exception: one row, where torch.unique over columns is the per-row union
    assert sorted(reference_candidates(teacher[:1].tolist(), student[:1].tolist(), 3)[0]) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("rows, vocab, k, strength", [(6, 40, 5, 1.0), (5, 30, 4, 0.3), (3, 50257, 5, 1.0)])
def test_official_rank_matches_reference(rows, vocab, k, strength):
    student, teacher = random_logits(rows, vocab, seed=rows + vocab)
    assert all(len(row) == 2 * k for row in reference_candidates(teacher.tolist(), student.tolist(), k))
    values = RankLoss(k, rank_temperature=strength)(Rows(student, teacher)).values
    expected = reference_official_rank(teacher.tolist(), student.tolist(), k, strength)
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float64))


def test_rlkd_objective_is_rank_plus_half_kl():
    """recipes/rlkd.yaml's loss on a [B, T, V] batch: 1 - mean Pearson of soft ranks + KL / 2."""
    generator = torch.Generator().manual_seed(3)
    student = 2 * torch.randn(2, 4, 12, dtype=torch.float64, generator=generator)
    teacher = 2 * torch.randn(2, 4, 12, dtype=torch.float64, generator=generator)
    mask = torch.tensor([[True, True, False, True], [False, True, True, True]])
    output = build_loss("rank:5,fkl=0.5")(student, teacher, mask)
    teacher_rows, student_rows = teacher[mask].tolist(), student[mask].tolist()
    rank = sum(reference_official_rank(teacher_rows, student_rows, 5, 1.0)) / len(teacher_rows)
    kl = sum(reference_kl(t, s) for t, s in zip(teacher_rows, student_rows)) / len(teacher_rows)
    torch.testing.assert_close(output.loss, torch.tensor(rank + kl / 2, dtype=torch.float64))


def test_near_hard_ranks_agree_with_the_pairwise_variant_on_a_per_row_union():
    """The issue's check: at near-hard ranks with a per-row union, l2 and pairwise-sigmoid
    ranks are the same hard ranks, so the losses agree; at strength 1 they differ."""
    student, teacher = random_logits(6, 30, seed=19)
    rows = Rows(student, teacher)
    l2 = RankLoss(5, rank_temperature=1e-4, rank_method="l2", rank_union="row")(rows).values
    sigmoid = RankLoss(5, rank_temperature=1e-4, rank_method="sigmoid", rank_union="row")(rows).values
    torch.testing.assert_close(l2, sigmoid, atol=1e-12, rtol=0)
    soft_l2 = RankLoss(5, rank_method="l2", rank_union="row")(rows).values
    soft_sigmoid = RankLoss(5, rank_method="sigmoid", rank_union="row")(rows).values
    assert (soft_l2 - soft_sigmoid).abs().max() > 1e-3


def test_official_gradcheck_through_the_loss():
    student, teacher = random_logits(4, 9, seed=23)
    term = RankLoss(3)
    assert torch.autograd.gradcheck(lambda logits: term(Rows(logits, teacher)).values, (student.requires_grad_(True),))
