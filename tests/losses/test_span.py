"""The span loss against a slow reference, plus gradients and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr_cli.losses.base import Rows
from mgsr_cli.losses.span import SpanLoss

RELATIONS = ["pearson", "pearson_logprobs", "hadamard_cosine", "hadamard", "cosine", "inner"]


@pytest.fixture(autouse=True)
def one_thread():
    """These tensors are tiny: a second thread only adds synchronisation cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _softmax(logits: list[float]) -> list[float]:
    finite = [x for x in logits if x != -math.inf]
    largest = max(finite)
    total = sum(math.exp(x - largest) for x in finite)
    return [math.exp(x - largest) / total if x != -math.inf else 0.0 for x in logits]


def _inner(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b))


def _cosine(a: list[float], b: list[float]) -> float:
    return _inner(a, b) / math.sqrt(_inner(a, a) * _inner(b, b))


def _pearson(a: list[float], b: list[float]) -> float:
    mean_a, mean_b = sum(a) / len(a), sum(b) / len(b)
    return _cosine([x - mean_a for x in a], [y - mean_b for y in b])


def _log(probs: list[float]) -> list[float]:
    return [math.log(x) if x > 0 else -math.inf for x in probs]


def reference_pair(
    student: list[list[float]], teacher: list[list[float]], first: int, second: int, relation: str
) -> float:
    """One pair's value, written out over the vocabulary."""
    p_i, p_j = _softmax(teacher[first]), _softmax(teacher[second])
    q_i, q_j = _softmax(student[first]), _softmax(student[second])
    if relation == "hadamard":
        return sum((p_i[k] * p_j[k] - q_i[k] * q_j[k]) ** 2 for k in range(len(p_i)))
    if relation == "hadamard_cosine":
        return 1 - _cosine([a * b for a, b in zip(p_i, p_j)], [a * b for a, b in zip(q_i, q_j)])
    if relation == "pearson_logprobs":  # over the entries finite in all four rows
        rows = [_log(row) for row in (p_i, p_j, q_i, q_j)]
        kept = [k for k in range(len(p_i)) if all(math.isfinite(row[k]) for row in rows)]
        lp_i, lp_j, lq_i, lq_j = ([row[k] for k in kept] for row in rows)
        return (_pearson(lp_i, lp_j) - _pearson(lq_i, lq_j)) ** 2
    measure = {"inner": _inner, "cosine": _cosine, "pearson": _pearson}[relation]
    return (measure(p_i, p_j) - measure(q_i, q_j)) ** 2


def random_rows(num_rows: int, vocab: int, seed: int, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    teacher = torch.randn(num_rows, vocab, generator=generator, dtype=torch.float64) * scale
    student = teacher + torch.randn(num_rows, vocab, generator=generator, dtype=torch.float64) * scale / 2
    return student, teacher


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize(
    "num_rows, vocab, pairs",
    [
        (2, 7, [[0, 1]]),
        (6, 7, [[0, 1], [1, 2], [2, 3], [4, 5], [0, 2], [1, 3]]),  # adjacent and all-pairs style
        (3, 50257, [[0, 1], [1, 2]]),
        (9, 7, [[1, 2], [2, 3], [6, 7]]),  # pairs on a few rows, adjacent among them
    ],
)
def test_matches_reference(relation, num_rows, vocab, pairs):
    student, teacher = random_rows(num_rows, vocab, seed=num_rows, scale=1.0 if vocab > 100 else 3.0)
    output = SpanLoss(span_relation=relation)(Rows(student, teacher, pairs=torch.tensor(pairs)))
    assert output.values.dtype == torch.float64 and output.values.shape == (len(pairs),)
    expected = [reference_pair(student.tolist(), teacher.tolist(), i, j, relation) for i, j in pairs]
    assert output.values.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)


# "pearson" takes its pair products from offset views or from gathers, and computes on every
# row or only on the pairs' rows (span._PairLayout): each layout is checked here.
PAIR_LAYOUTS = {
    "all_rows_adjacent": (4, [[0, 1], [1, 2], [2, 3]]),
    "all_rows_any": (4, [[0, 1], [1, 2], [2, 3], [0, 3]]),
    "some_rows_adjacent": (9, [[1, 2], [2, 3], [6, 7]]),
    "some_rows_any": (9, [[1, 3], [3, 7], [1, 7]]),
}


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("layout", PAIR_LAYOUTS, ids=list(PAIR_LAYOUTS))
def test_gradcheck(relation, layout):
    num_rows, pair_list = PAIR_LAYOUTS[layout]
    student, teacher = random_rows(num_rows, 5, seed=1)
    pairs = torch.tensor(pair_list)
    loss = SpanLoss(span_relation=relation)

    def function(student_logits):
        return loss(Rows(student_logits, teacher, pairs=pairs)).values

    assert torch.autograd.gradcheck(function, (student.requires_grad_(),))


@pytest.mark.parametrize("relation", RELATIONS)
def test_zero_for_identical_positive_otherwise(relation):
    student, teacher = random_rows(5, 30, seed=2)
    pairs = torch.tensor([[0, 1], [1, 2], [3, 4]])
    loss = SpanLoss(span_relation=relation)
    assert loss(Rows(teacher.clone(), teacher, pairs=pairs)).values.abs().max() < 1e-15
    assert (loss(Rows(student, teacher, pairs=pairs)).values > 0).all()


@pytest.mark.parametrize("pairs", [None, torch.zeros((0, 2), dtype=torch.long)], ids=["none", "empty"])
def test_no_pairs_gives_an_empty_value_that_still_backpropagates(pairs):
    student = torch.randn(3, 11, requires_grad=True)
    output = SpanLoss()(Rows(student, torch.randn(3, 11), pairs=pairs))
    assert output.values.shape == (0,) and output.values.dtype == torch.float32
    output.values.sum().backward()
    assert student.grad is not None and (student.grad == 0).all()


@pytest.mark.parametrize("relation", RELATIONS)
def test_teacher_is_detached_and_student_receives_gradient(relation):
    student, teacher = random_rows(3, 13, seed=3)
    student.requires_grad_()
    teacher.requires_grad_()
    SpanLoss(span_relation=relation)(
        Rows(student, teacher, pairs=torch.tensor([[0, 1], [1, 2]]))
    ).values.sum().backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_masked_vocabulary_and_low_precision(relation, dtype):
    student, teacher = random_rows(3, 40, seed=4, scale=8.0)
    student[:, :10] = -math.inf
    teacher[:, 5:15] = -math.inf
    student = student.to(dtype).requires_grad_()
    output = SpanLoss(span_relation=relation)(Rows(student, teacher.to(dtype), pairs=torch.tensor([[0, 1], [1, 2]])))
    assert output.values.dtype == torch.float32
    output.values.sum().backward()
    assert torch.isfinite(output.values).all() and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("relation", ["pearson", "pearson_logprobs"])
def test_pearson_relations_match_reference_with_masked_vocabulary(relation):
    student, teacher = random_rows(4, 12, seed=5)
    student[:, :2] = -math.inf
    teacher[1:, 10:] = -math.inf
    pairs = [[0, 1], [1, 2], [2, 3]]
    output = SpanLoss(span_relation=relation)(Rows(student, teacher, pairs=torch.tensor(pairs)))
    expected = [reference_pair(student.tolist(), teacher.tolist(), i, j, relation) for i, j in pairs]
    assert output.values.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_constant_rows_have_no_correlation():
    """A uniform row has no spread: its correlation counts as 0, with no NaN in value or gradient."""
    student = torch.zeros(2, 9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    values = SpanLoss()(Rows(student, teacher, pairs=torch.tensor([[0, 1]]))).values
    values.sum().backward()
    teacher_probs = torch.softmax(teacher, dim=-1).tolist()
    assert values.item() == pytest.approx(_pearson(*teacher_probs) ** 2, rel=1e-9)
    assert torch.isfinite(student.grad).all()


def test_default_is_pearson_and_not_inert_at_gpt2_vocabulary():
    """The reason for the default: the Hadamard distance of near-uniform 50257-token rows is
    ~1e-15 (inert at weight 1), the correlation gap is of the order of a KL term. Rows share
    a common component (as adjacent positions of a language model do), less so for the student."""
    generator = torch.Generator().manual_seed(7)
    shared = torch.randn(1, 50257, generator=generator)
    teacher = shared + torch.randn(4, 50257, generator=generator)
    student = 0.3 * shared + torch.randn(4, 50257, generator=generator)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3]])
    default = SpanLoss()(Rows(student.float(), teacher.float(), pairs=pairs)).values
    hadamard = SpanLoss(span_relation="hadamard")(Rows(student.float(), teacher.float(), pairs=pairs)).values
    assert SpanLoss().relation == "pearson"
    assert default.mean() > 1e-3 and hadamard.mean() < 1e-9


def test_unknown_relation_raises():
    with pytest.raises(ValueError, match="span_relation"):
        SpanLoss(span_relation="outer")
