"""`generate` and `evaluate` through the CLI, in-process and as real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from typer.testing import CliRunner

from mgsr_cli.artifacts import iter_records, read_stage
from mgsr_cli.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(arg) for arg in args])


def mgsr(*args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mgsr_cli.cli", *map(str, args)], capture_output=True, text=True, **kwargs)


def test_help_lists_the_four_stages():
    result = invoke("--help")
    assert result.exit_code == 0
    for stage in ("generate", "correct", "distill", "evaluate"):
        assert stage in result.output


def test_generate_then_evaluate(tiny_pair, tmp_path, gpt2_tokenizer):
    teacher, student = tiny_pair
    common = ["--data", "dolly", "--limit", "4", "--max-new-tokens", "12", "--batch-size", "3"]
    result = invoke("generate", "--model", student, "--out", tmp_path / "gen", "--seed", "7", *common)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "gen")
    manifest, records = read_stage(tmp_path / "gen", ("generate",))
    assert manifest["status"] == "complete" and manifest["record_count"] == 4 == len(records)
    assert manifest["inputs"]["data"]["sha256"] and manifest["models"]["model"] == str(student)
    for record in records:
        assert {"id", "prompt", "prompt_ids", "response", "response_ids"} <= set(record)
        assert gpt2_tokenizer.decode(record["response_ids"], skip_special_tokens=True) == record["response"]
        assert gpt2_tokenizer.decode(record["prompt_ids"]) == record["prompt"]
        assert 1 <= len(record["response_ids"]) <= 12

    again = invoke("generate", "--model", student, "--out", tmp_path / "gen2", "--seed", "7", *common)
    assert again.exit_code == 0
    assert list(iter_records(tmp_path / "gen2" / "records.jsonl")) == records
    other_seed = invoke("generate", "--model", student, "--out", tmp_path / "gen3", "--seed", "8", *common)
    assert other_seed.exit_code == 0, other_seed.output
    assert [r["response_ids"] for r in iter_records(tmp_path / "gen3" / "records.jsonl")] != [r["response_ids"] for r in records]

    result = invoke(
        "evaluate", "--model", f"teacher={teacher}", "--model", student, "--data", "dolly", "--data", "vicuna",
        "--seeds", "10,20", "--limit", "3", "--max-new-tokens", "8", "--out", tmp_path / "eval",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert set(report["results"]) == {"teacher", "student"}
    for row in report["results"].values():
        assert set(row) == {"dolly", "vicuna", "average"}
        assert row["dolly"]["examples"] == 3 and set(row["dolly"]["per_seed"]) == {"10", "20"}
        assert 0 <= row["average"]["mean"] <= 100
    predictions = list(iter_records(tmp_path / "eval" / "records.jsonl"))
    assert len(predictions) == 2 * 2 * 2 * 3
    assert "| teacher |" in (tmp_path / "eval" / "report.md").read_text()


def test_generate_as_a_subprocess_prints_only_the_output_path(tiny_pair, tmp_path):
    result = mgsr("generate", "--model", tiny_pair[1], "--data", "vicuna", "--limit", "2", "--max-new-tokens", "4", "--out", tmp_path / "g")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{tmp_path / 'g'}\n"


def test_killed_generate_resumes_without_duplicates_or_losses(tiny_pair, tmp_path):
    args = ["generate", "--model", tiny_pair[1], "--data", "dolly", "--limit", "24", "--batch-size", "2", "--max-new-tokens", "24", "--seed", "3"]
    reference = invoke(*args, "--out", tmp_path / "straight")
    assert reference.exit_code == 0, reference.output

    out = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "-m", "mgsr_cli.cli", *map(str, args), "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (records.exists() and records.read_text().count("\n") >= 4):
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    written = records.read_text().count("\n")
    assert 4 <= written < 24, "the kill should land mid-run"
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    resumed = mgsr(*args, "--out", out)
    assert resumed.returncode == 0, resumed.stderr
    ids = [record["id"] for record in iter_records(records)]
    assert len(ids) == len(set(ids)) == 24
    by_id = {record["id"]: record for record in iter_records(tmp_path / "straight" / "records.jsonl")}
    assert {record["id"]: record for record in iter_records(records)} == by_id
