"""Crashes and concurrency: SIGKILL of real processes at chosen points of every stage (output-dir
creation, record appends, a checkpoint write) and at seeded random moments, two writers on one
--out, a full disk, SIGINT and SIGTERM during every stage. Each run is then finished in-process
and compared with an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mgsr_cli.cli import app

from .test_distill_robustness import distill_args

runner = CliRunner()

# Run the CLI in a child whose named function SIGKILLs the process at the chosen call.
BOOT = """
import os, signal, sys, time
from pathlib import Path
point, when = sys.argv[1], int(sys.argv[2])
calls = [0]
def die_after(module, name, condition=lambda *a, **k: True, hang=False):
    original = getattr(module, name)
    def wrapped(*args, **kwargs):
        result = None if name == "replace" else original(*args, **kwargs)
        if condition(*args, **kwargs):
            calls[0] += 1
            if calls[0] == when:
                if hang:
                    Path(os.environ["MGSR_TEST_MARK"]).write_text("open")
                    time.sleep(600)
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs) if name == "replace" else result
    setattr(module, name, wrapped)
from mgsr_cli import artifacts
if point == "manifest-rename":  # the temp manifest is written, the rename never happens
    die_after(os, "replace", lambda src, dst: str(dst).endswith("manifest.json"))
elif point == "append":
    die_after(artifacts.StageWriter, "append")
elif point == "open-and-hold":
    die_after(artifacts.StageWriter, "open", hang=True)
elif point == "checkpoint-write":  # Accelerate wrote the temporary checkpoint; not renamed yet
    import accelerate
    die_after(accelerate.Accelerator, "save_state")
from mgsr_cli.cli import main
sys.argv = ["mgsr", *sys.argv[3:]]
main()
"""


def crash(point: str, when: int, *args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BOOT, point, str(when), *map(str, args)], capture_output=True, text=True, **kwargs)


def invoke(*args):
    return runner.invoke(app, [str(arg) for arg in args])


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


def assert_same_as_straight(out: Path, straight: Path, count: int) -> None:
    got = records(out)
    ids = [record["id"] for record in got]
    assert len(ids) == len(set(ids)) == count, "no duplicate and no lost record"
    expected = {record["id"]: record for record in records(straight)}
    assert {record["id"]: record for record in got} == expected
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["record_count"] == count


def generate_args(tiny_pair, out: Path) -> list:
    return ["generate", "--model", tiny_pair[1], "--data", "dolly", "--limit", "4", "--batch-size", "2", "--max-new-tokens", "3",
            "--out", out]


def test_generate_killed_while_creating_its_output_then_mid_append(tiny_pair, tmp_path):
    straight = tmp_path / "straight"
    assert invoke(*generate_args(tiny_pair, straight)).exit_code == 0
    out = tmp_path / "out"
    killed = crash("manifest-rename", 1, *generate_args(tiny_pair, out))
    assert killed.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists() and any(out.glob(".manifest.json.*.tmp")), "only a temp manifest is left"
    killed = crash("append", 1, *generate_args(tiny_pair, out))  # the leftover is cleaned, one batch is written
    assert killed.returncode == -signal.SIGKILL and len(records(out)) == 2
    assert not list(out.glob(".manifest.json.*.tmp"))
    resumed = invoke(*generate_args(tiny_pair, out))
    assert resumed.exit_code == 0, resumed.output
    assert_same_as_straight(out, straight, 4)


def test_correct_and_evaluate_killed_creating_their_output_then_mid_append_resume_to_the_same_records(tiny_pair, tmp_path):
    generated = tmp_path / "gen"
    assert invoke(*generate_args(tiny_pair, generated)).exit_code == 0
    correct = ["correct", "--input", generated, "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--batch-size", "2", "--out"]
    evaluate = ["evaluate", "--model", tiny_pair[1], "--data", "vicuna", "--limit", "2", "--batch-size", "1", "--seeds", "10,20",
                "--max-new-tokens", "3", "--out"]
    for args, count in ((correct, 4), (evaluate, 4)):
        straight, out = tmp_path / f"{args[0]}-straight", tmp_path / f"{args[0]}-killed"
        assert invoke(*args, straight).exit_code == 0
        killed = crash("manifest-rename", 1, *args, out)  # killed while creating its output directory
        assert killed.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
        killed = crash("append", 1, *args, out)  # the leftover is cleaned; killed again mid-append
        assert killed.returncode == -signal.SIGKILL
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"
        assert 0 < len(records(out)) < count
        resumed = invoke(*args, out)
        assert resumed.exit_code == 0, resumed.output
        assert_same_as_straight(out, straight, count)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "model.safetensors"))


def _steps(out: Path) -> list[int]:
    return [line["step"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in line]


KD_STEPS = 8
KD = ["--recipe", "kd", "--max-steps", str(KD_STEPS), "--eval-every", "0", "--dev-data", ""]


@pytest.fixture(scope="module")
def kd_straight(tiny_pair, tmp_path_factory) -> Path:
    """One uninterrupted KD run that every interrupted distill here is compared with (saving does not change the weights)."""
    straight = tmp_path_factory.mktemp("kd") / "straight"
    assert invoke(*distill_args(tiny_pair, straight, *KD)).exit_code == 0
    return straight


def assert_same_weights(out: Path, straight: Path) -> None:
    assert _steps(out) == list(range(1, KD_STEPS + 1)), "metrics agree with the checkpoint: no step twice, none lost"
    expected, got = _weights(straight), _weights(out)
    for name in expected:  # resume restores weights, optimizer, schedule and data order: equal to float32 rounding
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


def test_distill_killed_creating_its_output_before_its_first_checkpoint_and_during_a_checkpoint_write(tiny_pair, tmp_path, kd_straight):
    extra = [*KD, "--save-every", "1"]

    out = tmp_path / "killed"
    killed = crash("manifest-rename", 1, *distill_args(tiny_pair, out, *extra))  # while creating its output directory
    assert killed.returncode == -signal.SIGKILL and not (out / "manifest.json").exists()
    killed = crash("checkpoint-write", 1, *distill_args(tiny_pair, out, *extra))  # before the first checkpoint is in place
    assert killed.returncode == -signal.SIGKILL and _steps(out) == [1]
    assert not (out / "checkpoints" / "latest").exists()
    killed = crash("checkpoint-write", 2, *distill_args(tiny_pair, out, *extra))  # a plain re-run starts clean
    assert killed.returncode == -signal.SIGKILL and _steps(out) == [1, 2]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001"
    resumed = invoke(*distill_args(tiny_pair, out, *extra), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert_same_weights(out, kd_straight)


def test_a_second_writer_stops_at_once_while_the_first_holds_the_output(tiny_pair, tmp_path):
    out, mark = tmp_path / "out", tmp_path / "mark"
    first = subprocess.Popen([sys.executable, "-c", BOOT, "open-and-hold", "1", *map(str, generate_args(tiny_pair, out))],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**__import__("os").environ, "MGSR_TEST_MARK": str(mark)})
    try:
        deadline = time.time() + 120
        while not mark.exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        started = time.perf_counter()
        second = invoke(*generate_args(tiny_pair, out))
        assert second.exit_code == 2
        assert "being written by another mgsr run" in second.stderr.splitlines()[-1]
        assert time.perf_counter() - started < 30
    finally:
        first.kill()
        first.wait()
    again = invoke(*generate_args(tiny_pair, out))  # the kernel dropped the dead writer's lock
    assert again.exit_code == 0, again.output
    ids = [record["id"] for record in records(out)]
    assert len(ids) == len(set(ids)) == 4


@contextlib.contextmanager
def small_files(limit: int):
    """Files this process writes stop at `limit` bytes, failing with EFBIG as on a full disk (in
    process: the soft limit is raised back afterwards, which needs no privilege)."""
    previous_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails instead of killing
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, previous_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, previous_limit)
        signal.signal(signal.SIGXFSZ, previous_handler)


def test_a_full_disk_while_appending_records_and_saving_a_checkpoint(tiny_pair, tmp_path):
    straight, out = tmp_path / "straight", tmp_path / "out"
    assert invoke(*generate_args(tiny_pair, straight)).exit_code == 0
    with small_files((straight / "records.jsonl").stat().st_size // 2):
        full = invoke(*generate_args(tiny_pair, out))
    assert full.exit_code == 2 and "Traceback" not in full.stderr
    last = full.stderr.splitlines()[-1]
    assert last.startswith("error: cannot access") and "records.jsonl" in last, last
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"
    resumed = invoke(*generate_args(tiny_pair, out))
    assert resumed.exit_code == 0, resumed.output
    assert_same_as_straight(out, straight, 4)

    run = tmp_path / "distill"
    with small_files(1 << 20):
        full = invoke(*distill_args(tiny_pair, run, "--recipe", "kd", "--max-steps", "2", "--eval-every", "0", "--dev-data", ""))
    assert full.exit_code == 2 and "Traceback" not in full.stderr, full.stderr
    last = full.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "checkpoint" in last, last
    assert json.loads((run / "manifest.json").read_text())["status"] == "running" and not (run / "student").exists()


# ---------------------------------------------------------------- SIGINT and SIGTERM, in process
# The signal is real (os.kill on this process, right after a record or metrics line is written);
# only the process is shared with pytest, which a stray SIGTERM would otherwise end.


@pytest.fixture
def signals_caught_by_mgsr():
    def stray(signum, frame):
        raise AssertionError("a SIGTERM reached the test runner: mgsr did not handle it")

    # Ctrl-C as in a terminal (a shell starts background jobs with SIGINT ignored)
    previous = signal.signal(signal.SIGTERM, stray), signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGTERM, previous[0])
    signal.signal(signal.SIGINT, previous[1])


def interrupted(monkeypatch, signum: int, *args):
    """Run the CLI in-process; the first record append (a metrics line for distill) is followed by `signum`."""
    from mgsr_cli.artifacts import StageWriter

    original = StageWriter.append
    sent = []

    def append_then_signal(self, records):
        original(self, records)
        if not sent:
            sent.append(signum)
            os.kill(os.getpid(), signum)

    with monkeypatch.context() as patch:
        patch.setattr(StageWriter, "append", append_then_signal)
        result = invoke(*args)
    assert sent, "the run ended before its first record"
    assert result.exit_code == 128 + signum, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: stopped by {signal.Signals(signum).name}"), result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    return lines[-1]


def test_sigint_then_sigterm_during_generate_correct_and_evaluate_resume_to_the_same_records(
        tiny_pair, tmp_path, monkeypatch, signals_caught_by_mgsr):
    generated = tmp_path / "gen"
    generate = generate_args(tiny_pair, generated)
    generate[generate.index("--limit") + 1] = "6"
    assert invoke(*generate).exit_code == 0
    correct = ["correct", "--input", generated, "--teacher", tiny_pair[0], "--student", tiny_pair[1], "--batch-size", "2", "--out"]
    evaluate = ["evaluate", "--model", tiny_pair[1], "--data", "vicuna", "--limit", "3", "--batch-size", "1", "--seeds", "10,20",
                "--max-new-tokens", "2", "--out"]
    for args, count in ((generate[:-1], 6), (correct, 6), (evaluate, 6)):
        straight, out = tmp_path / f"{args[0]}-straight", tmp_path / f"{args[0]}-stopped"
        assert invoke(*args, straight).exit_code == 0
        interrupted(monkeypatch, signal.SIGINT, *args, out)
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"
        assert 0 < len(records(out)) < count
        interrupted(monkeypatch, signal.SIGTERM, *args, out)  # the re-run resumes, and is stopped in turn
        assert json.loads((out / "manifest.json").read_text())["status"] == "running"
        resumed = invoke(*args, out)
        assert resumed.exit_code == 0, resumed.output
        assert_same_as_straight(out, straight, count)


def test_sigint_then_sigterm_during_distill_checkpoint_and_resume_bit_exact(tiny_pair, tmp_path, monkeypatch, signals_caught_by_mgsr,
                                                                           kd_straight):
    extra = [*KD, "--save-every", "0"]  # only the signal makes a checkpoint
    out = tmp_path / "stopped"
    last = interrupted(monkeypatch, signal.SIGINT, *distill_args(tiny_pair, out, *extra))  # after step 1's metrics
    assert "step 1" in last and "--resume" in last
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000001" and _steps(out) == [1]
    interrupted(monkeypatch, signal.SIGTERM, *distill_args(tiny_pair, out, *extra), "--resume")  # after step 2's
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002" and _steps(out) == [1, 2]
    resumed = invoke(*distill_args(tiny_pair, out, *extra), "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert_same_weights(out, kd_straight)


# ---------------------------------------------------------------- SIGKILL at random moments
# Each run is killed a seeded random time after it has visibly made progress (a new line in its
# records or metrics), so the kills land anywhere: mid-step, mid-append, mid-checkpoint-write.


def _version(path: Path):
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None


def kill_at_random(args: list, progress: Path, rng: random.Random, seconds: float) -> int | None:
    """SIGKILL the CLI process `uniform(0, seconds)` after it first wrote `progress`; its exit status if it ended first."""
    before = _version(progress)
    process = subprocess.Popen([sys.executable, "-m", "mgsr_cli.cli", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while _version(progress) == before and process.poll() is None:
        assert time.time() < deadline, "no progress"
        time.sleep(0.02)
    time.sleep(rng.uniform(0, seconds))
    process.kill()
    status = process.wait()
    return None if status == -signal.SIGKILL else status


def test_distill_killed_at_random_moments_resumes_to_the_weights_of_a_straight_run(tiny_pair, tmp_path, kd_straight):
    extra = [*KD, "--save-every", "1"]
    out, rng, kills = tmp_path / "killed", random.Random(12), 0
    for _ in range(2):
        status = kill_at_random([*distill_args(tiny_pair, out, *extra), "--resume"], out / "metrics.jsonl", rng, 0.8)
        assert status in (None, 0)
        if json.loads((out / "manifest.json").read_text())["status"] == "complete":
            break  # it finished (perhaps killed while exiting): a re-run would refuse the complete output
        kills += 1
    assert kills >= 1, "the runs were too short to be killed"
    if json.loads((out / "manifest.json").read_text())["status"] != "complete":
        resumed = invoke(*distill_args(tiny_pair, out, *extra), "--resume")
        assert resumed.exit_code == 0, resumed.output
    assert_same_weights(out, kd_straight)


def test_generate_killed_at_random_moments_reruns_to_the_records_of_a_straight_run(tiny_pair, tmp_path):
    args = generate_args(tiny_pair, tmp_path / "straight")
    for flag, value in (("--limit", "8"), ("--batch-size", "1"), ("--max-new-tokens", "24")):  # about a second of records
        args[args.index(flag) + 1] = value
    assert invoke(*args).exit_code == 0
    out, rng = tmp_path / "killed", random.Random(3)
    args[-1] = out
    for _ in range(2):
        status = kill_at_random(args, out / "records.jsonl", rng, 0.3)
        assert status in (None, 0)
        if json.loads((out / "manifest.json").read_text())["status"] == "complete":
            break  # it finished (perhaps killed while exiting): a re-run would refuse the complete output
    else:
        assert invoke(*args).exit_code == 0
    assert_same_as_straight(out, tmp_path / "straight", 8)
