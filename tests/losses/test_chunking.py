"""Chunked evaluation equals the unchunked one, and chunks never split a span pair."""

from __future__ import annotations

import itertools

import pytest
import torch

from mgsr_cli.losses import Objective, Rows, TermOutput, build_loss, plan_chunks

ALL_TOKEN_TERMS = "sft,fkl,rkl,skl:0.1,srkl:0.1,gjsd:0.5,js,tvd,akl:0.5,rank:3=2"


class PairGap:
    """A test-only pair term: how far the student's log-prob difference between a pair's
    rows is from the teacher's. It asserts that every pair it sees lies in its chunk."""

    name = "pair_gap"
    unit = "pair"

    def __call__(self, rows: Rows) -> TermOutput:
        assert rows.pairs is not None and bool(((rows.pairs >= 0) & (rows.pairs < rows.num_rows)).all())
        student = torch.log_softmax(rows.student_logits.to(torch.float64), dim=-1)
        teacher = torch.log_softmax(rows.teacher_logits.to(torch.float64), dim=-1)
        first, second = rows.pairs[:, 0], rows.pairs[:, 1]
        gap = (student[first] - student[second]) - (teacher[first] - teacher[second])
        return TermOutput(values=gap.square().mean(dim=-1), stats={"pair_gap_max": gap.detach().abs().amax(dim=-1)})


def objective_with_pairs(spec: str, chunk_size: int | None, temperature: float = 1.0) -> Objective:
    terms = build_loss(spec).weighted_terms + [(PairGap(), 0.7)]
    return Objective(terms, temperature=temperature, chunk_size=chunk_size)


def random_batch(seed: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn(3, 6, 11, generator=generator, dtype=dtype)
    teacher = torch.randn(3, 6, 11, generator=generator, dtype=dtype)
    mask = torch.rand(3, 6, generator=generator) > 0.25
    labels = torch.randint(0, 11, (3, 6), generator=generator)
    return student, teacher, mask, labels


def adjacent_span_pairs(mask: torch.Tensor) -> torch.Tensor:
    """(b, t, t + 1) for every pair of consecutive masked positions, plus one long pair."""
    pairs = [(b, t, t + 1) for b in range(mask.shape[0]) for t in range(mask.shape[1] - 1) if mask[b, t] and mask[b, t + 1]]
    positions = mask[0].nonzero().flatten().tolist()
    pairs.append((0, positions[0], positions[-1]))  # a pair across the whole first sequence
    return torch.tensor(pairs, dtype=torch.long)


def run(objective: Objective, student, teacher, mask, labels, span_pairs):
    student = student.detach().clone().requires_grad_(True)
    output = objective(student, teacher, mask, labels=labels, span_pairs=span_pairs)
    output.loss.backward()
    return output, student.grad


def test_plan_without_pairs():
    assert plan_chunks(10, 3, None) == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert plan_chunks(5, 10, None) == [(0, 5)]
    assert plan_chunks(0, 4, None) == []
    with pytest.raises(ValueError):
        plan_chunks(5, 0, None)


@pytest.mark.parametrize(
    "num_rows, chunk_size, pairs, expected",
    [
        (10, 3, [[2, 3]], [(0, 4), (4, 7), (7, 10)]),
        (10, 3, [[2, 3], [3, 4]], [(0, 5), (5, 8), (8, 10)]),
        (10, 3, [[1, 6]], [(0, 7), (7, 10)]),
        (10, 3, [[6, 1]], [(0, 7), (7, 10)]),
        (10, 3, [[0, 1], [3, 4]], [(0, 3), (3, 6), (6, 9), (9, 10)]),
        (7, 1, [[0, 1], [4, 5]], [(0, 2), (2, 3), (3, 4), (4, 6), (6, 7)]),
    ],
)
def test_plan_moves_boundaries_past_pairs(num_rows, chunk_size, pairs, expected):
    assert plan_chunks(num_rows, chunk_size, torch.tensor(pairs)) == expected


def test_plan_never_splits_random_pairs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        num_rows = int(torch.randint(1, 40, (1,), generator=generator))
        starts = torch.randint(0, num_rows, (5,), generator=generator)
        pairs = torch.stack([starts, (starts + torch.randint(0, 4, (5,), generator=generator)).clamp_max(num_rows - 1)], 1)
        chunk_size = int(torch.randint(1, 8, (1,), generator=generator))
        chunks = plan_chunks(num_rows, chunk_size, pairs)
        assert chunks[0][0] == 0 and chunks[-1][1] == num_rows
        assert all(previous[1] == following[0] for previous, following in itertools.pairwise(chunks))
        assert all(end - start >= min(chunk_size, num_rows - start) for start, end in chunks)
        for first, second in pairs.tolist():
            assert any(start <= min(first, second) and max(first, second) < end for start, end in chunks)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 64])  # N = 11 rows: 2, 3, 5 do not divide it
def test_chunked_equals_unchunked(chunk_size, temperature):
    student, teacher, mask, labels = random_batch(seed=1)
    span_pairs = adjacent_span_pairs(mask)
    plain, plain_grad = run(objective_with_pairs(ALL_TOKEN_TERMS, None, temperature), student, teacher, mask, labels, span_pairs)
    chunked, chunked_grad = run(
        objective_with_pairs(ALL_TOKEN_TERMS, chunk_size, temperature), student, teacher, mask, labels, span_pairs
    )
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked.per_token, plain.per_token, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(chunked_grad, plain_grad, rtol=1e-12, atol=1e-12)
    assert chunked.terms.keys() == plain.terms.keys() and chunked.stats.keys() == plain.stats.keys()
    for name in plain.terms:
        torch.testing.assert_close(chunked.terms[name], plain.terms[name], rtol=1e-12, atol=1e-12)
    assert chunked.stats["pair_gap_max"] == pytest.approx(plain.stats["pair_gap_max"], rel=1e-12)
    torch.testing.assert_close(plain.per_token[mask].mean(), plain.loss)


def test_chunked_equals_unchunked_in_bf16():
    student, teacher, mask, labels = random_batch(seed=2, dtype=torch.bfloat16)
    objective = build_loss(ALL_TOKEN_TERMS)
    plain, plain_grad = run(objective, student, teacher, mask, labels, None)
    chunked, chunked_grad = run(build_loss(ALL_TOKEN_TERMS, chunk_size=3), student, teacher, mask, labels, None)
    torch.testing.assert_close(chunked.loss, plain.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chunked_grad.float(), plain_grad.float())


def test_score_rows_over_chunks_adds_up_to_forward():
    """The training loop's path: score each chunk against the global counts, then sum."""
    student, teacher, mask, labels = random_batch(seed=3)
    span_pairs = adjacent_span_pairs(mask)
    objective = objective_with_pairs(ALL_TOKEN_TERMS, None)
    expected, expected_grad = run(objective, student, teacher, mask, labels, span_pairs)

    student = student.detach().clone().requires_grad_(True)
    rows = Rows(student[mask], teacher[mask], labels[mask], objective._pair_rows(span_pairs, mask))
    token_count, pair_count = rows.num_rows, rows.pairs.shape[0]
    total = 0
    for start, end in plan_chunks(token_count, 4, rows.pairs):
        inside = (rows.pairs.min(dim=1).values >= start) & (rows.pairs.max(dim=1).values < end)
        chunk = Rows(rows.student_logits[start:end], rows.teacher_logits[start:end], rows.targets[start:end],
                     rows.pairs[inside] - start)
        total = total + objective.score_rows(chunk, token_count, pair_count).loss
    total.backward()
    torch.testing.assert_close(total, expected.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(student.grad, expected_grad, rtol=1e-12, atol=1e-12)


def test_pair_terms_need_span_pairs():
    student, teacher, mask, labels = random_batch(seed=4)
    objective = objective_with_pairs("fkl", 2)
    with pytest.raises(ValueError, match="needs span_pairs"):
        objective(student, teacher, mask, labels=labels)
    unmasked = (~mask).nonzero()[0].tolist()
    with pytest.raises(ValueError, match="mask is True"):
        objective(student, teacher, mask, span_pairs=torch.tensor([[unmasked[0], unmasked[1], unmasked[1]]]))
    no_pairs = objective(student, teacher, mask, span_pairs=torch.zeros(0, 3, dtype=torch.long))
    assert no_pairs.terms["pair_gap"].item() == 0.0 and torch.isfinite(no_pairs.loss)
