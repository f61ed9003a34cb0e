"""Bad input: one line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import write_jsonl


def mgsr(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgsr_cli.cli", *map(str, args)], capture_output=True, text=True)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    assert result.stdout == ""


@pytest.fixture
def generate(tiny_pair, tmp_path):
    def run(data, model=None, out=None):
        out = out or tmp_path / "out"
        return mgsr("generate", "--model", model or tiny_pair[1], "--data", data, "--max-new-tokens", "2", "--out", out), out

    return run


def test_missing_data_file(generate, tmp_path):
    result, out = generate(tmp_path / "absent.jsonl")
    assert_one_line_error(result, "absent.jsonl", "not found")
    assert not out.exists()


def test_malformed_jsonl_names_the_line(generate, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a"}\n{"instruction": "b"}\n{broken\n')
    result, out = generate(path)
    assert_one_line_error(result, "bad.jsonl:3", "malformed JSON")
    assert not out.exists()


def test_missing_field(generate, tmp_path):
    result, out = generate(write_jsonl(tmp_path / "d.jsonl", [{"question": "x"}]))
    assert_one_line_error(result, "d.jsonl:1", "missing field 'instruction'")
    assert not out.exists()


def test_unknown_model_path(generate, small_data, tmp_path):
    result, out = generate(small_data, model=tmp_path / "no-such-model")
    assert_one_line_error(result, "no-such-model", "not found")
    assert not out.exists()


def test_output_dir_with_another_stages_artifacts(generate, small_data, tmp_path):
    foreign = tmp_path / "evaluated"
    foreign.mkdir()
    (foreign / "manifest.json").write_text('{"stage": "evaluate", "status": "complete"}')
    result, _ = generate(small_data, out=foreign)
    assert_one_line_error(result, "holds 'evaluate' artifacts")
    assert sorted(path.name for path in foreign.iterdir()) == ["manifest.json"]


def test_complete_output_is_not_overwritten_without_the_flag(generate, small_data, tiny_pair, tmp_path):
    from typer.testing import CliRunner

    from mgsr_cli.cli import app

    args = ["generate", "--model", str(tiny_pair[1]), "--data", str(small_data), "--max-new-tokens", "2", "--out", str(tmp_path / "out")]
    assert CliRunner().invoke(app, args).exit_code == 0
    result, _ = generate(small_data)
    assert_one_line_error(result, "--overwrite")
