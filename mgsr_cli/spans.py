"""Span priors: which response tokens belong together, for the span loss (method.md section 3).

Batch building calls three functions here:
- `token_offsets` gives the character range of each response token in the response text,
  found by incremental decoding, without re-tokenising.
- `response_spans` groups tokens into spans [start, end) with a prior: `phrases`, the
  built-in offline rule-based chunker for noun, verb and prepositional phrases of
  phrases.py (the default); `words`, the tokens of one whitespace-delimited word; `fixed:N`, runs of N
  tokens; or `spacy`, spaCy noun chunks, which falls back to `phrases` with a warning when
  spaCy or en_core_web_sm is missing.
- `span_pairs` turns spans into the (i, j) token pairs the loss compares.

A token belongs to the phrase or word that holds its anchor, the first non-space
character at or after the token's start. GPT-2's " word" tokens therefore go with their
word, and a space-only token goes with the word after it.
"""

from __future__ import annotations

import bisect
import functools
import logging
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from mgsr_cli.phrases import phrase_ranges

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

REPLACEMENT_CHARACTER = "\ufffd"
# Tokens of context decoded before a token, so tokenizers that drop a leading space when
# decoding from the start (sentencepiece) still show it.
DECODE_CONTEXT = 4
# How far past the expected position a token's text is looked for when the decoded text and
# the response text differ (e.g. a response stored without its leading space).
ALIGN_SLACK = 8
PRIORS = ("phrases", "words", "fixed:N", "spacy")
PAIR_MODES = ("adjacent", "all")
_NON_SPACE = re.compile(r"\S")


# ---------------------------------------------------------------- token offsets


def token_offsets(
    tokenizer: PreTrainedTokenizerBase, response_ids: Sequence[int], response_text: str
) -> list[tuple[int, int]]:
    """(start, end) character offsets of each response token in response_text.

    When response_text is the decoding of response_ids, the offsets partition it:
    concatenating text[start:end] over the tokens gives response_text back. A character
    split across tokens (a byte-level BPE token can hold part of a UTF-8 character)
    belongs to the token that completes it. The tokens before it hold empty spans at the
    character's start, so their anchor is that character. Tokens whose text is missing
    from response_text (e.g. an end-of-sequence token the text leaves out) get an empty
    span at the current position.
    """
    return _align(_decoded_pieces(tokenizer, list(response_ids)), response_text)


def _decoded_pieces(tokenizer: PreTrainedTokenizerBase, ids: list[int]) -> list[str]:
    """The text each token completes: decode a short window and hold back a trailing
    replacement character, which means the last UTF-8 character has not finished yet."""

    def decode(window: list[int]) -> str:
        return tokenizer.decode(window, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    pieces: list[str] = []
    first_pending = 0  # first token whose text is not yet final
    emitted = 0  # characters of the current window already attributed
    for index in range(len(ids)):
        window_start = max(0, first_pending - DECODE_CONTEXT)
        if index == first_pending:
            emitted = len(decode(ids[window_start:first_pending]))
        decoded = decode(ids[window_start : index + 1])
        complete = decoded if index == len(ids) - 1 else decoded.rstrip(REPLACEMENT_CHARACTER)
        pieces.append(complete[emitted:])
        emitted = max(emitted, len(complete))
        if len(complete) == len(decoded):
            first_pending = index + 1
    return pieces


def _align(pieces: list[str], text: str) -> list[tuple[int, int]]:
    """Place each piece at the cursor in text; when it is not there, look for its
    non-space part a little further on (absorbing what lies between), else give it an
    empty span at the cursor."""
    offsets = []
    cursor = 0
    for piece in pieces:
        if text.startswith(piece, cursor):
            end = cursor + len(piece)
        else:
            core = piece.strip()
            found = text.find(core, cursor, cursor + len(piece) + ALIGN_SLACK) if core else -1
            end = found + len(core) if found >= 0 else cursor
        offsets.append((cursor, end))
        cursor = end
    return offsets


# ---------------------------------------------------------------- spans


def response_spans(text: str, offsets: Sequence[tuple[int, int]], prior: str = "phrases") -> list[tuple[int, int]]:
    """Token-index spans [start, end) over the response tokens, in order, never overlapping.

    offsets: one (start, end) character range per token (see `token_offsets`). Tokens
    outside every phrase (punctuation, conjunctions, trailing space) belong to no span.
    Spans of one token are kept, though `span_pairs` makes no pair from them.
    """
    if prior == "phrases":
        return _token_spans(text, offsets, phrase_ranges(text))
    if prior == "words":
        return _token_spans(text, offsets, [match.span() for match in re.finditer(r"\S+", text)])
    if prior.startswith("fixed:"):
        return _fixed_spans(len(offsets), _fixed_length(prior))
    if prior == "spacy":
        chunker = _spacy_pipeline()
        ranges = (
            phrase_ranges(text)
            if chunker is None
            else [(chunk.start_char, chunk.end_char) for chunk in chunker(text).noun_chunks]
        )
        return _token_spans(text, offsets, ranges)
    raise ValueError(f"unknown span prior {prior!r}; valid: {', '.join(PRIORS)} (e.g. fixed:3)")


def span_pairs(spans: Sequence[tuple[int, int]], mode: str = "adjacent") -> list[tuple[int, int]]:
    """Token pairs (i, j), i < j, inside each span: (i, i + 1) for `adjacent`, every pair
    for `all`. Spans of one token give none."""
    if mode not in PAIR_MODES:
        raise ValueError(f"unknown span_pairs mode {mode!r}; valid: {', '.join(PAIR_MODES)}")
    pairs = []
    for start, end in spans:
        if mode == "adjacent":
            pairs.extend((index, index + 1) for index in range(start, end - 1))
        else:
            pairs.extend((first, second) for first in range(start, end) for second in range(first + 1, end))
    return pairs


def _fixed_length(prior: str) -> int:
    length = prior.removeprefix("fixed:")
    if not length.isdigit() or int(length) < 1:
        raise ValueError(f"span prior {prior!r} needs a positive whole number of tokens, e.g. fixed:3")
    return int(length)


def _fixed_spans(num_tokens: int, length: int) -> list[tuple[int, int]]:
    return [(start, min(start + length, num_tokens)) for start in range(0, num_tokens, length)]


def _token_spans(
    text: str, offsets: Sequence[tuple[int, int]], ranges: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Character ranges (sorted, disjoint) -> token spans of the tokens anchored in each."""
    starts = [start for start, _ in ranges]
    members: dict[int, list[int]] = {}
    for token, (start, _) in enumerate(offsets):
        anchor = _anchor(text, start)
        slot = bisect.bisect_right(starts, anchor) - 1
        if anchor < len(text) and slot >= 0 and anchor < ranges[slot][1]:
            members.setdefault(slot, []).append(token)
    return [(tokens[0], tokens[-1] + 1) for _, tokens in sorted(members.items())]


def _anchor(text: str, start: int) -> int:
    """The first non-space character at or after start (len(text) when there is none)."""
    match = _NON_SPACE.search(text, start)
    return match.start() if match else len(text)


@functools.cache
def _spacy_pipeline():
    """spaCy's en_core_web_sm, or None (with a one-line warning) when it cannot be loaded."""
    try:
        import spacy

        return spacy.load("en_core_web_sm")
    except (ImportError, OSError) as error:
        logger.warning("span prior 'spacy' unavailable (%s); using the built-in 'phrases' chunker", error)
        return None
