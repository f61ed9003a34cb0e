"""`mgsr correct` through the CLI: chained after generate, resumable, strict about its input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mgsr_cli.artifacts import iter_records, read_stage
from mgsr_cli.cli import app
from mgsr_cli.models import load_tokenizer

runner = CliRunner()
REQUIRED = {
    "id", "example_id", "sample_index", "prompt", "prompt_ids", "response", "response_ids", "references", "finish_reason",
    "original_response", "original_response_ids", "changed", "error_position", "divergence", "student_token", "teacher_token",
}


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


@pytest.fixture(scope="module")
def generated(tiny_pair, tmp_path_factory) -> Path:
    """A generate output of the tiny student: 5 prompts, up to 10 tokens each."""
    out = tmp_path_factory.mktemp("gen") / "gen"
    args = ["--data", "dolly", "--limit", "5", "--max-new-tokens", "10", "--seed", "3"]
    result = invoke("generate", "--model", tiny_pair[1], *args, "--out", out)
    assert result.exit_code == 0, result.output
    return Path(result.stdout.strip())


def correct(tiny_pair, input_dir, out, *extra):
    models = ["--teacher", tiny_pair[0], "--student", tiny_pair[1]]
    return invoke("correct", "--input", input_dir, *models, "--out", out, "--batch-size", "2", *extra)


def test_generate_then_correct_writes_drop_in_records(tiny_pair, generated, tmp_path, gpt2_tokenizer):
    result = correct(tiny_pair, generated, tmp_path / "cor", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tmp_path / 'cor'}\n"
    manifest, records = read_stage(tmp_path / "cor", ("correct",))
    _, inputs = read_stage(generated, ("generate",))
    assert manifest["config"]["scrg"]["sampling"]["max_new_tokens"] == 10  # the input's generation config by default
    assert manifest["inputs"]["input"]["sha256"] and set(manifest["models"]) == {"teacher", "student"}
    summary = manifest["summary"]
    assert summary["sequences"] == 5 and sum(summary["relative_error_position_histogram"]) == summary["changed"]
    assert [record["id"] for record in records] == [record["id"] for record in inputs]
    for record, source in zip(records, inputs):
        assert REQUIRED <= set(record)
        assert record["original_response_ids"] == source["response_ids"] and record["original_response"] == source["response"]
        assert gpt2_tokenizer.decode(record["response_ids"], skip_special_tokens=True) == record["response"]
        assert len(record["response_ids"]) <= 10
        j = record["error_position"]
        if record["changed"]:
            assert record["response_ids"][:j] == source["response_ids"][:j]
            assert record["response_ids"][j] == record["teacher_token"] != record["student_token"] == source["response_ids"][j]
            assert record["divergence"] >= 0
        else:
            assert j is None and record["response_ids"] == source["response_ids"]

    again = correct(tiny_pair, generated, tmp_path / "again", "--seed", "1")
    assert again.exit_code == 0 and list(iter_records(tmp_path / "again" / "records.jsonl")) == records
    chained = correct(tiny_pair, tmp_path / "cor", tmp_path / "chained", "--temperature", "0", "--teacher-token", "argmax")
    assert chained.exit_code == 0, chained.output
    chained_manifest, chained_records = read_stage(tmp_path / "chained", ("correct",))
    sampling = chained_manifest["config"]["scrg"]["sampling"]
    assert sampling["temperature"] == 0 and sampling["max_new_tokens"] == 10  # flags override, the rest is the input's
    assert [r["original_response_ids"] for r in chained_records] == [r["response_ids"] for r in records]


def test_an_interrupted_correct_resumes_without_duplicates(tiny_pair, generated, tmp_path):
    assert correct(tiny_pair, generated, tmp_path / "straight").exit_code == 0
    expected = list(iter_records(tmp_path / "straight" / "records.jsonl"))
    out = tmp_path / "cut"
    shutil.copytree(tmp_path / "straight", out)
    lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
    (out / "records.jsonl").write_text("".join(lines[:3]) + lines[3][:25])  # a crash while writing the second batch
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "status": "running", "summary": None}))

    resumed = correct(tiny_pair, generated, out)
    assert resumed.exit_code == 0, resumed.output
    assert list(iter_records(out / "records.jsonl")) == expected


@pytest.mark.parametrize("case", ["missing", "no_manifest", "unfinished", "wrong_stage"])
def test_an_input_that_is_not_a_complete_generate_output_is_refused(tiny_pair, generated, tmp_path, case):
    source = tmp_path / "input"
    if case == "no_manifest":
        source.mkdir()
        (source / "records.jsonl").write_text("{}\n")
    elif case in ("unfinished", "wrong_stage"):
        shutil.copytree(generated, source)
        manifest = json.loads((source / "manifest.json").read_text())
        changes = {"status": "running"} if case == "unfinished" else {"stage": "evaluate"}
        (source / "manifest.json").write_text(json.dumps({**manifest, **changes}))
    result = correct(tiny_pair, source, tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_teacher_with_another_vocabulary_is_refused(tiny_pair, generated, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_pair[0], teacher)
    tokenizer = load_tokenizer(str(teacher))
    tokenizer.add_tokens(["<new>"])
    tokenizer.save_pretrained(str(teacher))
    result = invoke("correct", "--input", generated, "--teacher", teacher, "--student", tiny_pair[1], "--out", tmp_path / "out")
    assert result.exit_code == 2 and "do not share a vocabulary" in result.stderr and result.stderr.count("\n") == 1
