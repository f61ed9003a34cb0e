"""Distill's generated flags (mgsr_cli/flags.py): a renamed flag and its older spelling set the same
config field, and errors name the primary flag."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from mgsr_cli import train
from mgsr_cli.cli import app

SPELLINGS = ["--max-prompt-length", "--data-format-max-prompt-length"]


def distill(monkeypatch, tmp_path, *args: str):
    """`mgsr distill ARGS` in-process with training replaced by recording the config it gets."""
    configs = []
    monkeypatch.setattr(train, "run_distill", lambda config, out, **_: configs.append(config) or out)
    result = CliRunner().invoke(app, ["distill", "--out", str(tmp_path / "run"), *args])
    return result, configs


@pytest.mark.parametrize("flag", SPELLINGS)
def test_max_prompt_length_sets_the_data_format_field(flag, monkeypatch, tmp_path):
    result, configs = distill(monkeypatch, tmp_path, flag, "100", "--max-length", "300")
    assert result.exit_code == 0, result.output
    assert configs[0].data_format.max_prompt_length == 100 and configs[0].max_length == 300


def test_help_shows_the_short_spelling_first(monkeypatch, tmp_path):
    result = CliRunner().invoke(app, ["distill", "--help"])
    assert result.exit_code == 0
    assert "--max-prompt-length, --data-format-max-prompt-length" in " ".join(result.output.split())


@pytest.mark.parametrize("flag", SPELLINGS)
@pytest.mark.parametrize("value, message", [("512", "--max-length 512 must exceed --max-prompt-length 512"),
                                            ("0", "--max-prompt-length: must be at least 1")])
def test_errors_name_the_primary_flag(flag, value, message, monkeypatch, tmp_path):
    result, configs = distill(monkeypatch, tmp_path, flag, value)
    assert result.exit_code == 2 and not configs
    assert message in result.output, result.output
