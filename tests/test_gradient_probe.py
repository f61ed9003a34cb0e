"""The gradient-share probe of logging steps: the right rows, each term alone, no side effects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from mgsr_cli import gradient_probe
from mgsr_cli.batches import Sequence, collate
from mgsr_cli.gradient_probe import probe_gradient_shares
from mgsr_cli.heads import hidden_states, project
from mgsr_cli.losses import Rows, build_loss
from mgsr_cli.losses.gradient_share import term_gradient_norms

VOCAB = 64


def tiny_model(seed: int) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.5)
    return GPT2LMHeadModel(config)


def part(objective):
    sequences = [
        Sequence("a", [1, 2, 3], [4, 5, 6, 7], pairs=[(0, 1), (1, 2), (2, 3)]),
        Sequence("b", [8, 9], [10, 11, 12], pairs=[(0, 1)]),
    ]
    batch = collate(sequences, pad_id=0)
    teacher = tiny_model(1)
    with torch.no_grad():
        hidden, _ = hidden_states(teacher, batch.input_ids, batch.attention_mask)
    return SimpleNamespace(batch=batch, objective=objective, teacher_hidden=hidden[batch.rows[:, 0], batch.rows[:, 1]]), teacher


def test_probe_differentiates_each_term_on_the_first_rows_without_side_effects(monkeypatch):
    monkeypatch.setattr(gradient_probe, "PROBE_ROWS", 2)  # rows 0-1; the chained pairs of "a" move the cut to 4
    objective = build_loss("sft,fkl,span")
    probe_part, teacher = part(objective)
    student = tiny_model(0).train()
    rng = torch.get_rng_state()
    metrics = probe_gradient_shares([probe_part], student, teacher, VOCAB)
    assert student.training and torch.equal(torch.get_rng_state(), rng)  # dropout drew nothing
    student.eval()
    with torch.no_grad():
        hidden, _ = hidden_states(student, probe_part.batch.input_ids, probe_part.batch.attention_mask)
        rows = probe_part.batch.rows[:4]
        logits = project(student, hidden[rows[:, 0], rows[:, 1]], VOCAB)
        teacher_logits = project(teacher, probe_part.teacher_hidden[:4], VOCAB)
    expected = term_gradient_norms(objective, Rows(logits, teacher_logits, probe_part.batch.targets[:4], torch.tensor([[0, 1], [1, 2], [2, 3]])))
    for name, norm in expected.items():
        assert metrics[f"grad_norm/{name}"] == pytest.approx(norm, rel=1e-6)
    assert sum(metrics[f"grad_share/{name}"] for name in expected) == pytest.approx(1.0)
    assert metrics["grad_share/span"] > 1e-3
