"""SCRG as a library: error position, revision, cache reuse, eligibility, determinism."""

from __future__ import annotations

import copy

import pytest
import torch

from mgsr_cli.config import SamplingConfig, ScrgOptions
from mgsr_cli.errors import UsageError
from mgsr_cli.heads import backbone, hidden_states
from mgsr_cli.models import load_model
from mgsr_cli.losses.divergences import ForwardKL, JensenShannon, ReverseKL
from mgsr_cli.sampling import TokenSpace, continue_sampling, forward_step, left_pad, make_generator, position_ids_from_mask, sample
from mgsr_cli.models import check_same_vocabulary
from mgsr_cli.scrg import correct_sequences, eligible_end
from mgsr_cli.scrg_regenerate import regenerate
from mgsr_cli.scrg_scoring import first_disagreements, token_divergence

EOS = 50256
VOCAB = 50257
SPACE = TokenSpace((EOS,), EOS, VOCAB)
GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=16, max_length=1024)
ARGMAX = ScrgOptions(teacher_token="argmax", sampling=GREEDY)
SAMPLED = ScrgOptions(sampling=GREEDY)  # sampled teacher proposals, greedy re-generation


@pytest.fixture(scope="module")
def base_dir(tiny_pair):
    """The 2-layer tiny model: the fastest one to play both roles."""
    return str(tiny_pair[1])


def fresh(base_dir: str):
    return load_model(base_dir, torch.float32, torch.device("cpu"))


def force_token(model, position_id: int, token: int, strength: float = 200.0) -> None:
    """Make `model` put (almost) all its mass on `token` when predicting the token after
    absolute position `position_id`, and leave every other position untouched."""
    direction = model.get_output_embeddings().weight[token].detach()
    forced = strength * direction / direction.norm() ** 2

    def hook(module, args, kwargs, output):
        hidden = output.last_hidden_state.clone()
        hidden[kwargs["position_ids"] == position_id] = forced
        output["last_hidden_state"] = hidden
        return output

    backbone(model).register_forward_hook(hook, with_kwargs=True)


def greedy(model, prompts: list[list[int]], new_tokens: int, eos_ids=(EOS,)) -> list[list[int]]:
    config = SamplingConfig(temperature=0.0, max_new_tokens=new_tokens, max_length=1024)
    output = sample(model, prompts, config, None, TokenSpace(tuple(eos_ids), EOS, VOCAB))
    return [output.row(row) for row in range(len(prompts))]


def prompts_of(lengths: list[int], offset: int = 100) -> list[list[int]]:
    return [[(offset + 37 * row + 11 * index) % 5000 + 10 for index in range(length)] for row, length in enumerate(lengths)]


def test_the_one_disagreement_is_found_and_revised(base_dir):
    teacher, student = fresh(base_dir), fresh(base_dir)
    forced_position, forced_token = 20, 4242
    force_token(student, forced_position, forced_token)
    prompts = prompts_of([7, 10, 14])
    responses = greedy(student, prompts, 16, eos_ids=())
    expected = [forced_position + 1 - len(prompt) for prompt in prompts]  # j of the token predicted from position 20
    assert all(response[j] == forced_token for response, j in zip(responses, expected))

    corrections = correct_sequences(
        teacher, student, list(zip(prompts, responses)), SAMPLED, make_generator(0, torch.device("cpu")), SPACE
    )
    for prompt, response, j, correction in zip(prompts, responses, expected, corrections):
        assert correction.changed and len(correction.steps) == 1
        step = correction.steps[0]
        assert (step.position, step.student_token) == (j, forced_token)
        assert step.teacher_token != forced_token and step.divergence > 10
        assert correction.original_ids == response
        assert correction.response_ids[:j] == response[:j] and correction.response_ids[j] == step.teacher_token
        prefix = prompt + correction.response_ids[: j + 1]
        assert correction.response_ids[j + 1 :] == greedy(student, [prefix], 16 - j - 1)[0]
        assert len(correction.response_ids) <= 16


def test_cache_reuse_regenerates_what_re_encoding_would(base_dir):
    """A batch with different prompt lengths, kept prefixes and budgets: continuing from the
    re-aligned scoring cache equals sampling after re-encoding prompt + prefix + teacher token."""
    student = fresh(base_dir)
    prompts = prompts_of([3, 12, 7, 5])
    responses = [[(19 * row + 7 * index) % 3000 + 20 for index in range(length)] for row, length in enumerate([10, 6, 14, 9])]
    kept = [4, 0, 11, 8]  # response tokens kept before the teacher token
    teacher_tokens = [311, 42, 1000, 77]
    budgets = [9, 5, 3, 12]
    input_ids, mask = left_pad([prompt + response[:-1] for prompt, response in zip(prompts, responses)], EOS, torch.device("cpu"))
    rows = [0, 2, 3, 1]  # any order, any subset
    for config, seed in ((SamplingConfig(temperature=0.0), None), (SamplingConfig(temperature=1.0, top_k=50), 5)):
        with torch.inference_mode():
            _, cache = hidden_states(student, input_ids, mask, position_ids_from_mask(mask), use_cache=True)
            reused = regenerate(
                student, cache, input_ids, mask.sum(dim=1), torch.tensor(rows), torch.tensor([len(prompts[r]) + kept[r] for r in rows]),
                torch.tensor([teacher_tokens[r] for r in rows]), [budgets[r] for r in rows], config,
                None if seed is None else make_generator(seed, torch.device("cpu")), SPACE,
            )
            prefixes = [prompts[r] + responses[r][: kept[r]] + [teacher_tokens[r]] for r in rows]
            ids, prefix_mask = left_pad(prefixes, EOS, torch.device("cpu"))
            logits, fresh_cache = forward_step(student, ids, prefix_mask, position_ids_from_mask(prefix_mask))
            scratch = continue_sampling(
                student, logits, fresh_cache, prefix_mask, prefix_mask.sum(dim=1), [budgets[r] for r in rows], config,
                None if seed is None else make_generator(seed, torch.device("cpu")), SPACE,
            )
        assert [reused.row(i) for i in range(len(rows))] == [scratch.row(i) for i in range(len(rows))]
        assert [len(reused.row(i)) for i in range(len(rows))] == [budgets[r] for r in rows]


def test_identical_models_on_their_own_greedy_output_leave_everything_unchanged(base_dir):
    model = fresh(base_dir)
    prompts = prompts_of([4, 8])
    responses = greedy(model, prompts, 10)
    corrections = correct_sequences(model, model, list(zip(prompts, responses)), ARGMAX, None, SPACE)
    for response, correction in zip(responses, corrections):
        assert not correction.changed and correction.steps == [] and correction.response_ids == response


def test_positions_after_the_first_eos_are_never_chosen_but_the_eos_is(base_dir):
    teacher, student = fresh(base_dir), fresh(base_dir)
    prompts = prompts_of([6, 6])
    clean = greedy(teacher, prompts, 12, eos_ids=())
    force_token(student, 6 + 8, 4242)  # a huge divergence at response position 9, after the EOS
    after_eos = clean[0][6:9] + [4242] + clean[0][10:]  # the forced token, which the teacher would not propose
    responses = [clean[0][:5] + [EOS] + after_eos, clean[1][:3]]  # row 1 is short: its padding overlaps position 9
    corrections = correct_sequences(teacher, student, list(zip(prompts, responses)), ARGMAX, None, SPACE)
    assert corrections[0].changed and corrections[0].steps[0].position == 5 and corrections[0].steps[0].student_token == EOS
    assert corrections[0].response_ids[:5] == responses[0][:5]
    assert not corrections[1].changed and corrections[1].response_ids == responses[1]


def test_first_disagreements_visit_slots_by_divergence_and_skip_padding_and_agreement():
    inf = float("inf")
    divergence = torch.tensor([[0.1, 5.0, 0.3, -inf], [0.2, 0.2, -inf, -inf], [1.0, 2.0, -inf, -inf], [4.0, 3.0, 2.0, 1.0]])
    sizes = torch.tensor([3, 2, 2, 4])
    student = torch.tensor([[9, 2, 9, 0], [0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 7]])
    teacher = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [1, 1, 5, 5], [1, 1, 1, 8]])  # the proposals, as a table
    asked: list[tuple[int, int]] = []

    def propose(rows, slots):
        asked.extend(zip(rows.tolist(), slots.tolist()))
        return teacher[rows, slots]

    found, slots, tokens = first_disagreements(divergence, sizes, student, propose)
    assert found.tolist() == [True, True, False, True]
    assert slots.tolist() == [2, 0, 0, 3]  # row 0: slot 1 agrees; row 1: tie -> earliest; row 3: last in d order
    assert tokens.tolist() == [3, 5, 0, 8]
    assert not {(0, 3), (1, 2), (2, 2), (2, 3)} & set(asked)  # padding is never proposed for
    assert sorted(row for row, _ in asked).count(1) == 1  # a row stops at its first disagreement


@pytest.mark.parametrize("kind, term", [("fkl", ForwardKL()), ("rkl", ReverseKL()), ("js", JensenShannon())])
def test_token_divergence_matches_the_loss_library(kind, term):
    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(5, 300, generator=generator) * 3, torch.randn(5, 300, generator=generator) * 3
    expected = term.values(torch.log_softmax(teacher, -1), torch.log_softmax(student, -1))[0]
    assert torch.allclose(token_divergence(kind, teacher, student), expected, atol=1e-5)
    scratch = (torch.full((8, 300), float("nan")), torch.full((8, 300), float("nan")))  # reused buffers, larger than needed
    assert torch.allclose(token_divergence(kind, teacher, student, scratch), expected, atol=1e-5)
    assert torch.allclose(token_divergence(kind, teacher, teacher), torch.zeros(5), atol=1e-6)


def test_eligible_end_includes_the_first_eos_and_respects_the_budget():
    assert eligible_end([5, 6, EOS, 7, EOS], budget=10, eos_ids=[EOS]) == 3
    assert eligible_end([5, 6, 7], budget=10, eos_ids=[EOS]) == 3
    assert eligible_end([5, 6, 7, 8], budget=2, eos_ids=[EOS]) == 2


def test_argmax_greedy_is_deterministic_and_sampling_is_reproducible(base_dir):
    teacher, student = fresh(base_dir), fresh(base_dir)
    force_token(student, 12, 999, strength=3.0)  # a mild disagreement, so sampled proposals vary
    prompts = prompts_of([5, 8, 3])
    responses = greedy(student, prompts, 12)
    pairs = list(zip(prompts, responses))

    def run(options, seed):
        result = correct_sequences(teacher, student, pairs, options, make_generator(seed, torch.device("cpu")), SPACE)
        return [(c.response_ids, c.steps) for c in result]

    assert run(ARGMAX, 1) == run(ARGMAX, 2)
    sampled = ScrgOptions(sampling=SamplingConfig(temperature=1.0, max_new_tokens=12, max_length=1024))
    assert run(sampled, 3) == run(sampled, 3)
    assert run(sampled, 3) != run(sampled, 4)


def test_second_round_corrects_only_the_regenerated_suffix(base_dir):
    teacher, student = fresh(base_dir), fresh(base_dir)
    force_token(student, 9, 4242, strength=400.0)  # the larger disagreement: round 1
    force_token(student, 15, 1717)  # after it: round 2
    prompts = prompts_of([4, 6])
    pairs = list(zip(prompts, greedy(student, prompts, 16, eos_ids=())))
    one = correct_sequences(teacher, student, pairs, ARGMAX, None, SPACE)
    two_rounds = ScrgOptions(teacher_token="argmax", rounds=2, sampling=GREEDY)
    two = correct_sequences(teacher, student, pairs, two_rounds, None, SPACE)
    for prompt, first, second in zip(prompts, one, two):
        assert [step.position for step in first.steps] == [10 - len(prompt)]
        assert [step.position for step in second.steps] == [10 - len(prompt), 16 - len(prompt)]
        assert second.steps[0] == first.steps[0] and second.steps[1].student_token == 1717
        j = second.steps[1].position
        assert second.response_ids[:j] == first.response_ids[:j] and second.response_ids[j] == second.steps[1].teacher_token


def test_a_different_vocabulary_is_a_one_line_error(gpt2_tokenizer):
    other = copy.deepcopy(gpt2_tokenizer)
    other.add_tokens(["<extra_token>"])
    assert check_same_vocabulary(gpt2_tokenizer, copy.deepcopy(gpt2_tokenizer))
    with pytest.raises(UsageError, match="do not share a vocabulary.*50257 tokens, the student 50258") as error:
        check_same_vocabulary(gpt2_tokenizer, other)
    assert "\n" not in str(error.value)


def test_preflight_passes_a_sound_pair_and_names_a_broken_cache_in_one_line(base_dir, monkeypatch):
    from mgsr_cli import preflight as module

    student = fresh(base_dir)
    module.preflight({"teacher": student, "student": student}, SPACE, scrg_student=student)

    def misaligned(cache, rows, columns):  # what a cache layout SCRG misreads would do
        select_positions_before(cache, rows, (columns + 1).clamp(max=columns.max()))

    import mgsr_cli.scrg_regenerate as scrg_regenerate

    select_positions_before = scrg_regenerate.select_positions
    monkeypatch.setattr(scrg_regenerate, "select_positions", misaligned)
    with pytest.raises(UsageError, match=r"^preflight \(student, SCRG cache reuse\): continuing from the KV cache differs") as error:
        module.preflight({"student": student}, SPACE, scrg_student=student)
    assert "\n" not in str(error.value)


def test_preflight_refuses_a_vocabulary_larger_than_the_output_layer(base_dir):
    from mgsr_cli.preflight import preflight

    with pytest.raises(UsageError, match=r"^preflight \(student, vocabulary\): the output layer has 50257 rows, fewer than"):
        preflight({"student": fresh(base_dir)}, TokenSpace((EOS,), EOS, VOCAB + 10))
