"""Each term's gradient norm and share, against one-term objectives differentiated by hand."""

from __future__ import annotations

import pytest
import torch

from mgsr_cli.losses import Rows, build_loss
from mgsr_cli.losses.gradient_share import gradient_shares, term_gradient_norms


def sample_rows(vocab: int = 11) -> Rows:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(1, vocab, dtype=torch.float64, generator=generator)
    teacher = shared + torch.randn(6, vocab, dtype=torch.float64, generator=generator)
    student = 0.3 * shared + torch.randn(6, vocab, dtype=torch.float64, generator=generator)
    targets = torch.randint(0, vocab, (6,), generator=generator)
    return Rows(student, teacher, targets, torch.tensor([[0, 1], [1, 2], [3, 4]]))


def one_term_norm(spec: str, rows: Rows, **options) -> float:
    student = rows.student_logits.clone().requires_grad_(True)
    objective = build_loss(spec, fused=False, **options)
    score = objective.score_rows(Rows(student, rows.teacher_logits, rows.targets, rows.pairs), rows.num_rows, rows.pairs.shape[0])
    (gradient,) = torch.autograd.grad(score.loss, student)
    return float(gradient.norm())


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_norms_are_each_weighted_term_differentiated_alone(temperature):
    rows = sample_rows()
    norms = term_gradient_norms(build_loss("sft,fkl=2,span=0.5", temperature=temperature), rows)
    for spec, name in (("sft", "sft"), ("fkl=2", "fkl"), ("span=0.5", "span")):
        assert norms[name] == pytest.approx(one_term_norm(spec, rows, temperature=temperature), rel=1e-9)
    metrics = gradient_shares(norms)
    assert sum(metrics[f"grad_share/{name}"] for name in norms) == pytest.approx(1.0)
    assert metrics["grad_norm/fkl"] == norms["fkl"]


def test_an_inert_term_has_no_share():
    """The reason this is logged: the Hadamard span relation has ~no gradient, Pearson's is visible."""
    rows = sample_rows(vocab=2000)
    hadamard = gradient_shares(term_gradient_norms(build_loss("sft,span", span_relation="hadamard"), rows))
    pearson = gradient_shares(term_gradient_norms(build_loss("sft,span"), rows))
    assert hadamard["grad_share/span"] < 1e-4 < 1e-2 < pearson["grad_share/span"]


def test_all_zero_gradients_give_zero_shares():
    rows = sample_rows()
    same = Rows(rows.teacher_logits, rows.teacher_logits, rows.targets, rows.pairs)
    metrics = gradient_shares(term_gradient_norms(build_loss("fkl"), same))
    assert metrics == {"grad_norm/fkl": pytest.approx(0.0, abs=1e-12), "grad_share/fkl": pytest.approx(0.0, abs=1e-6)}


@pytest.mark.parametrize("block_entries", [11, 2 * 11, 4 * 11])
def test_norms_taken_block_by_block_equal_the_whole_sample(block_entries, monkeypatch):
    """Blocks of 1, 2 or 4 rows (moved past the span pairs [0, 1], [1, 2], [3, 4]): the squared
    norms of the blocks' gradients add up to the whole sample's, term by term (float64, 1e-9)."""
    from mgsr_cli.losses import fused

    rows = sample_rows()
    spec = "sft,dac_kl=0.5,span=0.5,rank:3=0.25"
    monkeypatch.setattr(fused, "BLOCK_ENTRIES", block_entries)
    norms = term_gradient_norms(build_loss(spec, fused=False), rows)
    for term_spec, name in (("sft", "sft"), ("dac_kl=0.5", "dac_kl"), ("span=0.5", "span"), ("rank:3=0.25", "rank")):
        assert norms[name] == pytest.approx(one_term_norm(term_spec, rows), rel=1e-9)
