"""The span loss against a slow reference, plus gradients and edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from mgsr_cli.losses.base import Rows
from mgsr_cli.losses.span import SpanLoss

RELATIONS = ["hadamard", "cosine", "inner"]


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


def reference_pair(
    student: list[list[float]], teacher: list[list[float]], first: int, second: int, relation: str
) -> float:
    """One pair's value, written out over the vocabulary."""
    p_i, p_j = _softmax(teacher[first]), _softmax(teacher[second])
    q_i, q_j = _softmax(student[first]), _softmax(student[second])
    if relation == "hadamard":
        return sum((p_i[k] * p_j[k] - q_i[k] * q_j[k]) ** 2 for k in range(len(p_i)))

    def inner(a, b):
        return sum(x * y for x, y in zip(a, b))

    def cosine(a, b):
        return inner(a, b) / math.sqrt(inner(a, a) * inner(b, b))

    measure = inner if relation == "inner" else cosine
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
    ],
)
def test_matches_reference(relation, num_rows, vocab, pairs):
    student, teacher = random_rows(num_rows, vocab, seed=num_rows, scale=1.0 if vocab > 100 else 3.0)
    output = SpanLoss(span_relation=relation)(Rows(student, teacher, pairs=torch.tensor(pairs)))
    assert output.values.dtype == torch.float64 and output.values.shape == (len(pairs),)
    expected = [reference_pair(student.tolist(), teacher.tolist(), i, j, relation) for i, j in pairs]
    assert output.values.tolist() == pytest.approx(expected, rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("relation", RELATIONS)
def test_gradcheck(relation):
    student, teacher = random_rows(4, 5, seed=1)
    pairs = torch.tensor([[0, 1], [1, 2], [2, 3], [0, 3]])
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


def test_unknown_relation_raises():
    with pytest.raises(ValueError, match="span_relation"):
        SpanLoss(span_relation="outer")
