"""The data loader: shipped sets, local formats, field mapping, the prompt template, errors."""

from __future__ import annotations

import json

import pytest

from mgsr_cli.config import DataConfig
from mgsr_cli.data import SHIPPED, Example, format_prompt, load_examples, shipped_path, tokenize_prompts
from mgsr_cli.errors import UsageError

from .conftest import write_jsonl


def test_template_reproduces_every_prompt_of_the_shipped_dolly_test_set():
    config = DataConfig()
    rows = [json.loads(line) for line in shipped_path("dolly").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 500
    for row in rows:
        assert format_prompt(row["instruction"], row.get("input", ""), config) == row["prompt"]


@pytest.mark.parametrize("name, count", [("dolly", 500), ("self_inst", 242), ("vicuna", 80), ("sinst", 1694), ("uinst", 1050), ("dolly_dev", 1000)])
def test_shipped_sets_load_with_references(name, count):
    examples = load_examples(name, DataConfig())
    assert len(examples) == count
    assert all(example.prompt.endswith("### Response:\n") and example.references for example in examples)


def test_sinst_keeps_every_reference():
    examples = load_examples("sinst", DataConfig())
    assert max(len(example.references) for example in examples) > 1


def test_limit_takes_the_first_examples():
    examples = load_examples("dolly", DataConfig(), limit=3)
    assert [example.id for example in examples] == ["0", "1", "2"]


def test_template_is_used_without_a_prompt_field_and_dolly_names_are_detected(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "Say hi.", "context": "ctx", "response": "hi"}])
    (example,) = load_examples(str(path), DataConfig())
    assert example.prompt == format_prompt("Say hi.", "ctx", DataConfig())
    assert "### Input:\nctx" in example.prompt
    assert example.references == ("hi",)


def test_configured_field_names(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "Why?", "answer": "Because."}])
    config = DataConfig(instruction_field="question", output_field="answer")
    (example,) = load_examples(str(path), config)
    assert "### Instruction:\nWhy?" in example.prompt and example.references == ("Because.",)


def test_csv_json_and_parquet_files(tmp_path):
    import datasets

    rows = [{"instruction": "A?", "input": "", "output": "a"}, {"instruction": "B?", "input": "x", "output": "b"}]
    table = datasets.Dataset.from_list(rows)
    table.to_csv(str(tmp_path / "d.csv"))
    table.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.csv", "d.parquet", "d.json"):
        examples = load_examples(str(tmp_path / name), DataConfig())
        assert [example.references for example in examples] == [("a",), ("b",)], name


def test_directory_of_files(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"instruction": "A?", "output": "a"}])
    write_jsonl(tmp_path / "b.jsonl", [{"instruction": "B?", "output": "b"}])
    assert len(load_examples(str(tmp_path), DataConfig())) == 2


def test_malformed_line_reports_its_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "ok", "output": "x"}\n\n{"instruction": oops}\n')
    with pytest.raises(UsageError, match=r"bad.jsonl:3: malformed JSON"):
        load_examples(str(path), DataConfig())


def test_missing_field_and_missing_file(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "fine"}, {"text": "no instruction"}])
    with pytest.raises(UsageError, match=r"d.jsonl:2: missing field 'instruction'"):
        load_examples(str(path), DataConfig())
    with pytest.raises(UsageError, match="not found"):
        load_examples(str(tmp_path / "nope.jsonl"), DataConfig())


def test_long_prompts_are_dropped_and_counted(gpt2_tokenizer, caplog):
    examples = [Example("a", "short prompt", ()), Example("b", "word " * 300, ()), Example("c", "also short", ())]
    kept = tokenize_prompts(examples, gpt2_tokenizer, max_prompt_length=256)
    assert [item.example.id for item in kept] == ["a", "c"]
    assert kept[0].prompt_ids == tuple(gpt2_tokenizer("short prompt")["input_ids"])
    assert "dropped 1 of 3 prompts" in caplog.text


def test_every_shipped_name_resolves_to_a_file():
    for name in SHIPPED:
        assert shipped_path(name).is_file(), name
