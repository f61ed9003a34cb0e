"""Crash safety and scale-out of `mgsr distill`, as real processes: SIGKILL + --resume, Ctrl-C,
NaN stop, and 2-process DDP (gloo on CPU) against 1 process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mgsr_cli.checkpoints import latest_checkpoint


def distill_args(tiny_pair, out: Path, *extra) -> list[str]:
    return [
        "distill", "--teacher", str(tiny_pair[0]), "--student", str(tiny_pair[1]), "--out", str(out),
        "--limit", "8", "--dev-limit", "4", "--batch-size", "2", "--max-length", "128", "--data-format-max-prompt-length", "96",
        "--sgo-sampling-max-new-tokens", "6", "--chunk-size", "64", "--log-every", "1", *extra,
    ]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "mgsr_cli.cli", *args]


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), capture_output=True, text=True)


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def sgo_state(out: Path):
    return torch.load(next(latest_checkpoint(out).glob("custom_checkpoint_1.pkl")), weights_only=False)["sgo"]


def wait_for(condition, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and not condition():
        assert process.poll() is None, "the run ended before the awaited point"
        time.sleep(0.05)
    assert condition(), "timed out"


def test_sigkill_then_resume_gives_the_same_weights_replay_buffer_and_theta(tiny_pair, tmp_path):
    """MGSR with θ = 1 (fresh SCRG outputs, replay buffer) and validation every 2 steps moving θ."""
    extra = ["--max-steps", "6", "--save-every", "1", "--eval-every", "2", "--theta-init", "1", "--replay-capacity", "3"]
    straight = run(*distill_args(tiny_pair, tmp_path / "straight", *extra))
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "killed"
    process = subprocess.Popen(command(*distill_args(tiny_pair, out, *extra)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: (checkpoint := latest_checkpoint(out)) is not None and checkpoint.name >= "step-00000003", process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    refused = run(*distill_args(tiny_pair, out, *extra))
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = run(*distill_args(tiny_pair, out, *extra), "--resume")
    assert resumed.returncode == 0, resumed.stderr

    expected, got = final_weights(tmp_path / "straight"), final_weights(out)
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    expected_state, got_state = sgo_state(tmp_path / "straight"), sgo_state(out)
    assert got_state.theta == expected_state.theta
    assert [(s.example_id, s.response_ids) for s in got_state.buffer] == [(s.example_id, s.response_ids) for s in expected_state.buffer]
    steps = [line["step"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in line]
    assert steps == list(range(1, 7)), "no step logged twice or lost"


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(tiny_pair, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        command(*distill_args(tiny_pair, out, "--recipe", "kd", "--max-steps", "400", "--eval-every", "0", "--save-every", "0")),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = out / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "continue with --resume" in stderr and stdout == ""
    checkpoint = latest_checkpoint(out)
    assert checkpoint is not None and int(checkpoint.name.split("-")[1]) >= 2


def test_non_finite_loss_stops_naming_step_and_term(tiny_pair, tmp_path):
    """An absurd learning rate overflows the weights after the first update; the next loss is NaN."""
    out = tmp_path / "run"
    result = run(*distill_args(tiny_pair, out, "--recipe", "kd", "--max-steps", "5", "--lr", "1e30", "--grad-clip", "0", "--eval-every", "0"))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: non-finite loss at step 2 (term fkl)"), result.stderr
    assert "Traceback" not in result.stderr
    assert latest_checkpoint(out).name == "step-00000001"


@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(), reason="torchrun missing")
def test_two_processes_give_the_losses_of_one(tiny_pair, tmp_path):
    """DDP on CPU (gloo): the same global batch split over 2 processes gives the same losses."""
    extra = ["--recipe", "kd", "--batch-size", "4", "--max-steps", "3", "--eval-every", "0"]
    single = run(*distill_args(tiny_pair, tmp_path / "one", *extra))
    assert single.returncode == 0, single.stderr
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    double = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", "29631", "-m", "mgsr_cli.cli", *distill_args(tiny_pair, tmp_path / "two", *extra)],
        capture_output=True, text=True,
    )
    assert double.returncode == 0, double.stderr
    assert double.stdout.strip() == str(tmp_path / "two"), "only rank 0 prints the output path"
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2

    def losses(out: Path) -> list[float]:
        return [line["loss"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in line]

    # float32 sums in a different order across processes: agreement to 1e-5 relative
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    single_weights, double_weights = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in single_weights:
        torch.testing.assert_close(double_weights[name], single_weights[name], rtol=1e-4, atol=1e-5, msg=name)
