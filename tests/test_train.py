"""The training step's pieces: fused chunked head == full-logit path, batches, SGO scheduler."""

from __future__ import annotations

import copy

import pytest
import torch

from mgsr_cli.batches import Sequence, collate
from mgsr_cli.config import DistillConfig
from mgsr_cli.heads import HeadLossInputs, fused_head_loss, hidden_states
from mgsr_cli.losses import build_loss
from mgsr_cli.models import load_model
from mgsr_cli.sgo import Policy, SgoState, choose_source, remember, update_theta


@pytest.fixture(scope="module")
def models64(tiny_pair):
    """Teacher and student in float64 so both paths can be compared to 1e-9."""
    cpu = torch.device("cpu")
    teacher = load_model(str(tiny_pair[0]), torch.float64, cpu)
    student = load_model(str(tiny_pair[1]), torch.float64, cpu)
    return teacher, student


def sequences() -> list[Sequence]:
    return [
        Sequence("a", [10, 11, 12, 13], [20, 21, 22, 23, 50256], pairs=[(0, 1), (1, 2), (3, 4)]),
        Sequence("b", [30, 31], [40, 41, 42], pairs=[(0, 1)]),
        Sequence("c", [5, 6, 7, 8, 9, 10], [1, 2], pairs=[]),
    ]


def full_logit_reference(student, teacher, objective, batch, vocab_size):
    """The plain path: [B, T, V] logits of both models into the public [B, T] loss API."""
    student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab_size]
    with torch.no_grad():
        teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[..., :vocab_size]
    mask = torch.zeros(batch.input_ids.shape, dtype=torch.bool)
    mask[batch.rows[:, 0], batch.rows[:, 1]] = True
    labels = torch.full(batch.input_ids.shape, -100, dtype=torch.long)
    labels[batch.rows[:, 0], batch.rows[:, 1]] = batch.targets
    span_pairs = torch.stack([batch.rows[batch.pairs[:, 0], 0], batch.rows[batch.pairs[:, 0], 1], batch.rows[batch.pairs[:, 1], 1]], dim=1)
    return objective(student_logits, teacher_logits, mask, labels=labels, span_pairs=span_pairs).loss


def fused(student, teacher, objective, batch, vocab_size, chunk_size):
    hidden, _ = hidden_states(student, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        teacher_hidden, _ = hidden_states(teacher, batch.input_ids, batch.attention_mask)
    rows = hidden[batch.rows[:, 0], batch.rows[:, 1]]
    inputs = HeadLossInputs(
        student=student,
        teacher=teacher,
        objective=objective,
        teacher_hidden=teacher_hidden[batch.rows[:, 0], batch.rows[:, 1]],
        targets=batch.targets,
        pairs=batch.pairs,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        token_count=batch.num_rows,
        pair_count=int(batch.pairs.shape[0]),
    )
    return fused_head_loss(inputs, rows), inputs.score


def gradients(loss, modules) -> dict[str, torch.Tensor]:
    for module in modules:
        module.zero_grad(set_to_none=True)
    loss.backward()
    return {f"{index}.{name}": parameter.grad.clone() for index, module in enumerate(modules)
            for name, parameter in module.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("spec", ["sft=1,dac_kl=1,span=1", "fkl", "rank:5=2,fkl=1", "gjsd:0.5,sft=0.5"])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_fused_chunked_head_equals_full_logit_path(models64, spec, chunk_size):
    teacher, student = models64
    student = copy.deepcopy(student)
    objective = build_loss(spec).double()
    batch = collate(sequences(), pad_id=50256)
    vocab = 50257
    reference = full_logit_reference(student, teacher, objective, batch, vocab)
    expected = gradients(reference, [student, objective])
    loss, score = fused(student, teacher, objective, batch, vocab, chunk_size)
    got = gradients(loss, [student, objective])
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-9, abs=1e-12)
    assert expected.keys() == got.keys() and len(got) > 0
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-7, atol=1e-10, msg=name)
    assert score.per_token.shape == (batch.num_rows,)


def test_fused_head_without_grad_computes_the_same_value(models64):
    teacher, student = models64
    objective = build_loss("fkl").double()
    batch = collate(sequences(), pad_id=50256)
    with torch.no_grad():
        loss, _ = fused(student, teacher, objective, batch, 50257, 3)
    assert float(loss) == pytest.approx(float(full_logit_reference(student, teacher, objective, batch, 50257).detach()), rel=1e-9)


def test_collate_rows_targets_and_pairs():
    batch = collate(sequences(), pad_id=0)
    assert batch.input_ids.shape == (3, 8)  # longest: 4 prompt + 5 response - 1
    assert batch.rows[:5].tolist() == [[0, 3], [0, 4], [0, 5], [0, 6], [0, 7]]
    assert batch.targets[:5].tolist() == [20, 21, 22, 23, 50256]
    assert batch.rows[5:8].tolist() == [[1, 1], [1, 2], [1, 3]]
    assert batch.pairs.tolist() == [[0, 1], [1, 2], [3, 4], [5, 6]]
    assert batch.attention_mask.sum(dim=1).tolist() == [8, 4, 7]


def test_adaptive_off_policy_rule():
    config = DistillConfig(replay_capacity=2, seed=0)
    policy = Policy.parse("adaptive_off_policy")
    state = SgoState(theta=0.0)
    assert {choose_source(policy, state, config, step, 100) for step in range(50)} == {"ground_truth"}
    state.theta = 1.0
    assert choose_source(policy, state, config, 0, 100) == "fresh"  # buffer not full
    remember(state, [Sequence(str(i), [1], [2]) for i in range(3)], capacity=2)
    assert [s.example_id for s in state.buffer] == ["1", "2"]
    sources = {choose_source(policy, state, config, step, 100) for step in range(90, 100)}
    assert sources <= {"fresh", "replay"} and "replay" in sources  # late steps: decayed s, replay
    update_theta(state := SgoState(theta=0.0), 2.0, config)
    update_theta(state, 2.05, config)
    assert state.theta == 0.0
    update_theta(state, 2.11, config)
    assert state.theta == pytest.approx(0.1) and state.previous_val_loss == 2.11


def test_policy_parsing():
    assert Policy.parse("mixed:0.3") == Policy("mixed", 0.3)
    from mgsr_cli.errors import UsageError

    for bad in ("sometimes", "mixed:2", "mixed:x", "none:1"):
        with pytest.raises(UsageError):
            Policy.parse(bad)
