"""`--dtype` is honoured or refused, never ignored: bf16 autocasts on the CPU too, fp16 needs CUDA,
and the manifest says how training ran and in what dtype the student was saved."""

from __future__ import annotations

import json
import math

from typer.testing import CliRunner

from mgsr_cli.cli import app
from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import override
from mgsr_cli.train import run_distill

from .test_distill import FAST, metrics


def first_loss(tiny_pair, out, dtype: str) -> tuple[float, dict]:
    config = override(DistillConfig(), {**FAST, "teacher": str(tiny_pair[0]), "student": str(tiny_pair[1]),
                                        "max_steps": 1, "loss": "sft,fkl", "dtype": dtype})
    run_distill(config, out)
    manifest = json.loads((out / "manifest.json").read_text())
    return next(line["loss"] for line in metrics(out) if "loss" in line), manifest


def test_bfloat16_on_cpu_autocasts_and_the_manifest_says_so(tiny_pair, tmp_path):
    full, full_manifest = first_loss(tiny_pair, tmp_path / "fp32", "float32")
    half, half_manifest = first_loss(tiny_pair, tmp_path / "bf16", "bfloat16")
    assert (full_manifest["training_precision"], half_manifest["training_precision"]) == ("no", "bf16")
    assert full_manifest["student_dtype"] == half_manifest["student_dtype"] == "float32"
    # bf16 matmuls change the loss in its third digit: the autocast really ran, and ran sanely.
    assert half != full and math.isclose(half, full, rel_tol=0.05)


def test_float16_on_cpu_is_refused_in_one_line(tiny_pair, tmp_path):
    result = CliRunner().invoke(app, ["distill", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]),
                                      "--out", str(tmp_path / "run"), "--dtype", "float16", "--max-steps", "1"])
    assert result.exit_code == 2
    assert "--dtype float16 needs CUDA" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.output
