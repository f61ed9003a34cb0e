"""Training sequences and batches: prompt + response token ids, the scored rows, the span pairs.

A sequence is scored at its response positions only: the logits at position t predict token
t + 1, so for a prompt of P tokens and a response of R tokens the rows are t = P-1 .. P+R-2
and their targets are the response tokens. Span pairs are computed once per sequence, when
the sequence is made, from the response text and the tokenizer's offsets. A chat sequence with
`chat_turns: all` also scores its earlier assistant turns inside the prompt (`prompt_targets`),
as rows after its response rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from mgsr_cli.chat import PAPERS, Rendering, earlier_assistant_positions, response_ids
from mgsr_cli.data import Example, tokenize_prompts
from mgsr_cli.spans import response_spans, span_pairs, token_offsets


@dataclass(frozen=True)
class SpanSettings:
    prior: str
    pairs: str


@dataclass
class Sequence:
    """One training sequence; `pairs` are (i, j) indices into its response tokens; `prompt_targets`
    are the positions of its prompt that are trained too (earlier assistant turns), never 0."""

    example_id: str
    prompt_ids: list[int]
    response_ids: list[int]
    pairs: list[tuple[int, int]] = field(default_factory=list)
    prompt_targets: tuple[int, ...] = ()


def make_sequence(
    example_id: str, prompt_ids: list[int], response_ids: list[int], tokenizer, spans: SpanSettings | None, prompt_targets: tuple[int, ...] = ()
) -> Sequence:
    """A sequence with its span pairs (when a span loss will read them)."""
    pairs: list[tuple[int, int]] = []
    if spans is not None and len(response_ids) > 1:
        text = tokenizer.decode(response_ids, skip_special_tokens=False)
        offsets = token_offsets(tokenizer, response_ids, text)
        pairs = span_pairs(response_spans(text, offsets, spans.prior), spans.pairs)
    return Sequence(example_id, list(prompt_ids), list(response_ids), pairs, prompt_targets)


def ground_truth_sequences(
    examples: list[Example],
    tokenizer,
    max_prompt_length: int,
    max_length: int,
    spans: SpanSettings | None,
    rendering: Rendering = PAPERS,
    chat_turns: str = "last",
) -> list[Sequence]:
    """Prompt + first reference + EOS per example, the response cut to fit max_length; chat-rendered
    examples take the response as the template renders the final assistant turn (chat.py)."""
    prompts = tokenize_prompts([example for example in examples if example.references], tokenizer, max_prompt_length, rendering)
    plain = tokenizer([prompt.example.references[0] for prompt in prompts], add_special_tokens=False)["input_ids"]
    sequences = []
    for prompt, reference_ids in zip(prompts, plain):
        example = prompt.example
        chat = rendering.chat_template and example.messages is not None
        if chat:
            response = response_ids(tokenizer, example, prompt.text, example.references[0])
        else:
            response = list(reference_ids) + [tokenizer.eos_token_id]
        trained = earlier_assistant_positions(tokenizer, example, prompt.text) if chat and chat_turns == "all" else ()
        response = response[: max_length - len(prompt.prompt_ids)]
        if response:
            sequences.append(make_sequence(example.id, list(prompt.prompt_ids), response, tokenizer, spans, trained))
    return sequences


@dataclass
class Batch:
    """input_ids / attention_mask: [B, L] right-padded; rows: [N, 2] (b, t) scored positions;
    targets: [N] the tokens those rows predict; pairs: [P, 2] indices into the N rows."""

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    targets: Tensor
    pairs: Tensor

    @property
    def num_rows(self) -> int:
        return int(self.rows.shape[0])

    def to(self, device: torch.device) -> "Batch":
        return Batch(*(tensor.to(device) for tensor in (self.input_ids, self.attention_mask, self.rows, self.targets, self.pairs)))


def collate(sequences: list[Sequence], pad_id: int) -> Batch:
    """Right-pad prompt + response (minus its last token, which predicts nothing scored)."""
    inputs = [sequence.prompt_ids + sequence.response_ids[:-1] for sequence in sequences]
    width = max((len(ids) for ids in inputs), default=0)
    input_ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(inputs), width), dtype=torch.long)
    rows, targets, pairs = [], [], []
    for index, (sequence, ids) in enumerate(zip(sequences, inputs)):
        input_ids[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, : len(ids)] = 1
        first_row = len(rows)
        start = len(sequence.prompt_ids) - 1
        rows.extend((index, start + offset) for offset in range(len(sequence.response_ids)))
        targets.extend(sequence.response_ids)
        rows.extend((index, position - 1) for position in sequence.prompt_targets)
        targets.extend(sequence.prompt_ids[position] for position in sequence.prompt_targets)
        pairs.extend((first_row + i, first_row + j) for i, j in sequence.pairs)
    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        rows=torch.tensor(rows, dtype=torch.long).reshape(-1, 2),
        targets=torch.tensor(targets, dtype=torch.long),
        pairs=torch.tensor(pairs, dtype=torch.long).reshape(-1, 2),
    )
