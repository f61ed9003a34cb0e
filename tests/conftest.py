"""Shared fixtures: the embedded tiny GPT-2 pair, its tokenizer, small data files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mgsr_cli.models import build_tiny_pair, load_tokenizer

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): the embedded default, built once per test session."""
    return build_tiny_pair(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture(scope="session")
def gpt2_tokenizer(tiny_pair):
    return load_tokenizer(str(tiny_pair[1]))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture
def small_data(tmp_path) -> Path:
    """Six instruction rows in the Alpaca/MiniLLM field layout (no ready prompt)."""
    rows = [
        {"instruction": f"Name a colour number {index}.", "input": "" if index % 2 else "Some context.", "output": f"Blue {index}."}
        for index in range(6)
    ]
    return write_jsonl(tmp_path / "small.jsonl", rows)
