"""Span priors: token offsets by incremental decoding, the phrase chunker, words, fixed runs, pairs."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
from transformers import GPT2TokenizerFast

from mgsr_cli import spans
from mgsr_cli.phrases import phrase_ranges
from mgsr_cli.spans import response_spans, span_pairs, token_offsets

TOKENIZER_DIRS = [
    Path(__file__).resolve().parents[1] / "mgsr_cli" / "assets" / "gpt2_tokenizer",
    Path("/work/shared/data/gpt2_tokenizer"),
]

SENTENCES = (
    "The quick brown fox jumps over the lazy dog, and the students learn the basic rules of chess in their "
    "first class. You should really try to explain it with simple words. The model is learning new patterns "
    "from the data."
)
PHRASES = [
    "The quick brown fox", "jumps", "over the lazy dog",
    "the students", "learn", "the basic rules", "of chess", "in their first class",
    "You", "should really try to explain", "it", "with simple words",
    "The model", "is learning", "new patterns", "from the data",
]  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_tokenizer():
    """The real GPT-2 BPE, built offline from vocab.json and merges.txt."""
    directory = next(path for path in TOKENIZER_DIRS if (path / "vocab.json").exists())
    return GPT2TokenizerFast.from_pretrained(str(directory))


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def token_span_of(offsets, start: int, end: int) -> tuple[int, int]:
    """The tokens whose characters overlap [start, end)."""
    inside = [
        index for index, (token_start, token_end) in enumerate(offsets) if token_start < end and token_end > start
    ]
    return inside[0], inside[-1] + 1


def expected_spans(text: str, offsets, phrases: list[str]) -> list[tuple[int, int]]:
    result, cursor = [], 0
    for phrase in phrases:
        start = text.index(phrase, cursor)
        cursor = start + len(phrase)
        result.append(token_span_of(offsets, start, cursor))
    return result


# ---------------------------------------------------------------- token offsets


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! This is plain ASCII text with  double spaces.\n\nAnd a new paragraph.",
        "Hi 🙂 café — naïve 日本語 text, 👍🏽 and a family 👨‍👩‍👧 emoji.",
        "  leading and trailing spaces  ",
        "数据科学",
        "",
    ],
    ids=["ascii", "multibyte", "spaces", "cjk-only", "empty"],
)
def test_offsets_round_trip(gpt2_tokenizer, text):
    ids = encode(gpt2_tokenizer, text)
    offsets = token_offsets(gpt2_tokenizer, ids, text)
    assert len(offsets) == len(ids)
    assert "".join(text[start:end] for start, end in offsets) == text
    assert all(start <= end for start, end in offsets)


def test_split_character_belongs_to_the_token_that_completes_it(gpt2_tokenizer):
    text = " 日本"
    ids = encode(gpt2_tokenizer, text)
    assert len(ids) > 2  # GPT-2 splits these characters' bytes across tokens
    offsets = token_offsets(gpt2_tokenizer, ids, text)
    pieces = [text[start:end] for start, end in offsets]
    assert "".join(pieces) == text and "日" in pieces and "本" in pieces
    assert all(piece in ("", " ", "日", "本") for piece in pieces)


def test_offsets_cover_a_special_token_kept_in_the_text(gpt2_tokenizer):
    ids = encode(gpt2_tokenizer, "Done.") + [gpt2_tokenizer.eos_token_id]
    text = gpt2_tokenizer.decode(ids, skip_special_tokens=False)
    offsets = token_offsets(gpt2_tokenizer, ids, text)
    assert [text[start:end] for start, end in offsets] == ["Done", ".", "<|endoftext|>"]


def test_offsets_tolerate_a_stripped_response_and_special_tokens(gpt2_tokenizer):
    ids = encode(gpt2_tokenizer, " Hello world") + [gpt2_tokenizer.eos_token_id]
    text = "Hello world"  # stored without the leading space the tokens carry
    offsets = token_offsets(gpt2_tokenizer, ids, text)
    assert [text[start:end] for start, end in offsets] == ["Hello", " world", ""]


# ---------------------------------------------------------------- priors


def test_phrase_chunks_of_a_hand_written_text(gpt2_tokenizer):
    assert [SENTENCES[start:end] for start, end in phrase_ranges(SENTENCES)] == PHRASES
    offsets = token_offsets(gpt2_tokenizer, encode(gpt2_tokenizer, SENTENCES), SENTENCES)
    assert response_spans(SENTENCES, offsets) == expected_spans(SENTENCES, offsets, PHRASES)


@pytest.mark.parametrize(
    "text, phrases",
    [
        (
            "Preheat the oven to 350 degrees.\n2. Mix the flour",
            ["Preheat", "the oven", "to 350 degrees", "2", "Mix", "the flour"],
        ),
        (
            "All of the very good models were trained on John's data.",
            ["All", "of the very good models", "were trained", "on John's data"],
        ),
        ("I think that it works with them", ["I", "think", "it", "works", "with them"]),
        ("The fox jumps quickly over the fence.", ["The fox", "jumps quickly", "over the fence"]),
        ("The Earth orbits the Sun once a year.", ["The Earth", "orbits", "the Sun", "a year"]),
        ("The students really learn the rules.", ["The students", "really learn", "the rules"]),
    ],
)
def test_phrase_chunker_rules(text, phrases):
    assert [text[start:end] for start, end in phrase_ranges(text)] == phrases


def test_words_prior(gpt2_tokenizer):
    text = "Hello, world! It's 3.5 km away."
    offsets = token_offsets(gpt2_tokenizer, encode(gpt2_tokenizer, text), text)
    words = ["Hello,", "world!", "It's", "3.5", "km", "away."]
    assert response_spans(text, offsets, "words") == expected_spans(text, offsets, words)


def test_words_prior_keeps_a_split_emoji_in_its_word(gpt2_tokenizer):
    text = "a 日本語 b"
    offsets = token_offsets(gpt2_tokenizer, encode(gpt2_tokenizer, text), text)
    spans_found = response_spans(text, offsets, "words")
    assert len(spans_found) == 3 and spans_found[0] == (0, 1) and spans_found[-1] == (len(offsets) - 1, len(offsets))
    start, end = spans_found[1]
    assert "".join(text[s:e] for s, e in offsets[start:end]) == " 日本語" and end - start > 3


@pytest.mark.parametrize(
    "length, expected", [(3, [(0, 3), (3, 6), (6, 7)]), (1, [(i, i + 1) for i in range(7)]), (10, [(0, 7)])]
)
def test_fixed_prior(length, expected):
    offsets = [(i, i + 1) for i in range(7)]
    assert response_spans("abcdefg", offsets, f"fixed:{length}") == expected


@pytest.mark.parametrize("prior", ["nouns", "fixed:0", "fixed:x", "fixed:"])
def test_unknown_prior_raises(prior):
    with pytest.raises(ValueError, match="span prior"):
        response_spans("a b", [(0, 1), (1, 3)], prior)


def test_spacy_prior_falls_back_to_phrases_with_a_warning(monkeypatch, caplog, gpt2_tokenizer):
    monkeypatch.setitem(sys.modules, "spacy", None)  # makes `import spacy` fail
    spans._spacy_pipeline.cache_clear()
    offsets = token_offsets(gpt2_tokenizer, encode(gpt2_tokenizer, SENTENCES), SENTENCES)
    with caplog.at_level(logging.WARNING, logger="mgsr_cli.spans"):
        found = response_spans(SENTENCES, offsets, "spacy")
    spans._spacy_pipeline.cache_clear()
    assert found == response_spans(SENTENCES, offsets, "phrases")
    assert len(caplog.records) == 1 and "phrases" in caplog.records[0].getMessage()


# ---------------------------------------------------------------- pairs


def test_span_pairs():
    spans_found = [(0, 3), (3, 4), (5, 7)]
    assert span_pairs(spans_found) == [(0, 1), (1, 2), (5, 6)]
    assert span_pairs(spans_found, "all") == [(0, 1), (0, 2), (1, 2), (5, 6)]
    assert span_pairs([(2, 3)]) == [] and span_pairs([]) == []
    with pytest.raises(ValueError, match="span_pairs"):
        span_pairs(spans_found, "neighbours")
