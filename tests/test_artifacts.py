"""Stage directories: atomic manifests, resume after a cut line, refusals."""

from __future__ import annotations

import json

import pytest

from mgsr_cli.artifacts import StageWriter, atomic_write_json, read_stage
from mgsr_cli.errors import UsageError


def open_writer(out, stage="generate", config=None, overwrite=False):
    return StageWriter.open(out, stage, config or {"a": 1}, inputs={}, models={}, tokenizer="tok", overwrite=overwrite)


def test_complete_run_round_trips(tmp_path):
    writer = open_writer(tmp_path / "out")
    writer.append([{"id": "1"}, {"id": "2"}])
    writer.complete(summary={"x": 1})
    manifest, records = read_stage(tmp_path / "out", ("generate",), tokenizer="tok")
    assert manifest["status"] == "complete" and manifest["record_count"] == 2 and manifest["summary"] == {"x": 1}
    assert [record["id"] for record in records] == ["1", "2"]


def test_resume_drops_a_cut_last_line_and_keeps_whole_records(tmp_path):
    writer = open_writer(tmp_path / "out")
    writer.append([{"id": "1"}])
    with open(writer.records_path, "a") as handle:
        handle.write('{"id": "2", "resp')  # a crash in the middle of a write
    writer.release()  # the crashed process's lock goes with it
    resumed = open_writer(tmp_path / "out")
    assert resumed.done_ids() == {"1"}
    resumed.append([{"id": "2"}])
    resumed.complete()
    assert [json.loads(line)["id"] for line in resumed.records_path.read_text().splitlines()] == ["1", "2"]


def test_refusals(tmp_path):
    out = tmp_path / "out"
    writer = open_writer(out)
    writer.append([{"id": "1"}])
    with pytest.raises(UsageError, match="being written by another mgsr run"):
        open_writer(out)
    writer.release()
    with pytest.raises(UsageError, match="holds 'generate' artifacts, not 'correct'"):
        open_writer(out, stage="correct")
    with pytest.raises(UsageError, match="different config"):
        open_writer(out, config={"a": 2})
    with pytest.raises(UsageError, match="unfinished 'generate' run"):
        read_stage(out, ("generate",))
    writer.complete()
    with pytest.raises(UsageError, match="complete 'generate' run; pass --overwrite"):
        open_writer(out)
    with pytest.raises(UsageError, match="different tokenizer"):
        read_stage(out, ("generate",), tokenizer="other")
    with pytest.raises(UsageError, match="expected correct"):
        read_stage(out, ("correct",))
    assert open_writer(out, overwrite=True).done_ids() == set()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no mgsr manifest"):
        open_writer(tmp_path / "foreign")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    atomic_write_json(tmp_path / "m.json", {"k": 1})
    atomic_write_json(tmp_path / "m.json", {"k": 2})
    assert json.loads((tmp_path / "m.json").read_text()) == {"k": 2}
    assert [path.name for path in tmp_path.iterdir()] == ["m.json"]
