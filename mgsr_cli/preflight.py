"""One tiny real forward of everything a later step needs, at the start of `correct` and `distill`.

A model whose output head, vocabulary, KV cache or sampling path mgsr cannot handle should fail
in the first seconds with one line, not hours into a run when θ first rises above 0 and SCRG
runs for the first time. The probe is a two-row batch of a few tokens: negligible next to loading.
"""

from __future__ import annotations

import torch
from torch import nn

from mgsr_cli.config import SamplingConfig
from mgsr_cli.errors import UsageError
from mgsr_cli.heads import check_head_matches_forward, hidden_states
from mgsr_cli.sampling import TokenSpace, left_pad, position_ids_from_mask, sample

PROBE_PROMPTS = ([3, 5, 7, 11], [13, 17])
PROBE_RESPONSES = ([19, 23, 29, 31], [37, 41, 43, 47])


def preflight(models: dict[str, nn.Module | None], token_space: TokenSpace, scrg_student: nn.Module | None = None) -> None:
    """Check every model in `models` (name -> model; None entries are skipped): the vocabulary fits
    its output layer, projecting hidden states reproduces its logits, and it can sample; with
    `scrg_student`, also that SCRG's re-generation from the scoring cache equals re-encoding.
    A failure is a one-line UsageError naming the model and the check."""
    for name, model in models.items():
        if model is None:
            continue
        _check(name, "vocabulary", lambda: _check_vocabulary(model, token_space))
        _check(name, "output head", lambda: check_head_matches_forward(model, token_space.vocab_size))
        _check(name, "generation", lambda: _check_generation(model, token_space))
    if scrg_student is not None:
        _check("student", "SCRG cache reuse", lambda: _check_cache_reuse(scrg_student, token_space))


def _check(name: str, what: str, run) -> None:
    try:
        run()
    except UsageError as error:
        raise UsageError(f"preflight ({name}, {what}): {error}") from None
    except Exception as error:  # noqa: BLE001 - any failure here would otherwise surface hours later
        first = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise UsageError(f"preflight ({name}, {what}): {type(error).__name__}: {first}") from None


def _check_vocabulary(model: nn.Module, token_space: TokenSpace) -> None:
    rows = model.get_output_embeddings().weight.shape[0]
    if rows < token_space.vocab_size:
        raise UsageError(f"the output layer has {rows} rows, fewer than the tokenizer's {token_space.vocab_size} tokens")
    outside = [i for i in (*token_space.eos_ids, token_space.pad_id) if not 0 <= i < token_space.vocab_size]
    if outside:
        raise UsageError(f"EOS/pad ids {outside} lie outside the tokenizer's {token_space.vocab_size} tokens")


def _probe(token_space: TokenSpace, sequences) -> list[list[int]]:
    return [[token % token_space.vocab_size for token in sequence] for sequence in sequences]


@torch.inference_mode()
def _check_generation(model: nn.Module, token_space: TokenSpace) -> None:
    output = sample(model, _probe(token_space, PROBE_PROMPTS), SamplingConfig(temperature=1.0, max_new_tokens=2), None, token_space)
    if int(output.tokens.max()) >= token_space.vocab_size:
        raise UsageError("sampling produced an id outside the tokenizer's vocabulary")


@torch.inference_mode()
def _check_cache_reuse(student: nn.Module, token_space: TokenSpace) -> None:
    """Continue a teacher-forced probe from its cache and by re-encoding: the next-token logits must agree."""
    from mgsr_cli.scrg_regenerate import resume_after_prefix

    device = next(student.parameters()).device
    prompts, responses = _probe(token_space, PROBE_PROMPTS), _probe(token_space, PROBE_RESPONSES)
    input_ids, mask = left_pad([p + r for p, r in zip(prompts, responses)], token_space.pad_id, device)
    _, cache = hidden_states(student, input_ids, mask, position_ids_from_mask(mask), use_cache=True)
    arguments = (input_ids, mask.sum(dim=1), torch.tensor([1, 0], device=device),
                 torch.tensor([len(prompts[1]) + 2, len(prompts[0]) + 1], device=device),
                 torch.tensor(_probe(token_space, [[53, 59]])[0], device=device))
    reused, _, _ = resume_after_prefix(student, cache, *arguments)
    encoded, _, _ = resume_after_prefix(student, None, *arguments)
    tolerance = 1e-3 if next(student.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(reused.float(), encoded.float(), atol=tolerance, rtol=tolerance):
        difference = (reused.float() - encoded.float()).abs().max().item()
        raise UsageError(f"continuing from the KV cache differs from re-encoding (max logit difference {difference:.3g})")
