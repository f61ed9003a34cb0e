"""Two gloo processes on the CPU: DDP parity with gradient accumulation, resuming on another world
size, and the one-line refusals of what a launch cannot do here.

DDP, not FSDP: Accelerate 1.16 runs any CPU launch as MULTI_CPU (DDP over gloo) and ignores an
FSDP plugin there, so recipes/accelerate/fsdp2.yaml needs CUDA devices; distill refuses FSDP on
the CPU in one line (tested below). The two processes are forked from pytest (no re-import, so
the test stays cheap) and given the environment torchrun gives its workers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import traceback

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

from mgsr_cli.cli import app
from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import from_dict
from mgsr_cli.distributed import Layout, check_resumable
from mgsr_cli.errors import UsageError
from mgsr_cli.train import Distillation, run_distill

# Constant LR (min_lr = lr) so the schedule does not depend on the run's length.
SETTINGS = {
    "loss": "fkl", "sgo_policy": "none", "scrg": False, "limit": 8, "dev_data": None, "batch_size": 4,
    "max_length": 96, "data_format": {"max_prompt_length": 64}, "lr": 1e-3, "min_lr": 1e-3, "eval_every": 0,
    "save_every": 2, "keep_checkpoints": 3, "log_every": 1, "device": "cpu", "dtype": "float32", "teacher_dtype": "float32",
    "max_steps": 4,
}
# 2 processes' all-reduce and 2 micro-batches in one process sum the same float32 gradients in
# another order; after 4 AdamW steps at lr 1e-3 the weights differ by ~1e-7, far below this.
TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def config(tiny_pair, **changes) -> DistillConfig:
    teacher, student = (str(path) for path in tiny_pair)
    return from_dict(DistillConfig, {**SETTINGS, "teacher": teacher, "student": student, **changes}, "test")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def interrupted_after_two_steps(run_config: DistillConfig, out, rank: int, port: int, errors) -> None:
    """One torchrun-like worker: trains, and (like Ctrl-C) stops with a checkpoint after step 2."""
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from accelerate.state import PartialState

        PartialState._reset_state()  # the forked copy of pytest's single-process state
        original = Distillation.train_step

        def step_then_stop(self, step):
            metrics = original(self, step)
            self.stop_requested = step == 1
            return metrics

        Distillation.train_step = step_then_stop
        try:
            run_distill(run_config, out)
        except KeyboardInterrupt:
            pass
        torch.distributed.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")


def student_at(checkpoint) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    return {name.removeprefix("student."): tensor for name, tensor in state.items() if name.startswith("student.")}


def assert_close(a: dict, b: dict) -> None:
    assert a and set(a) == set(b)
    for name in a:
        torch.testing.assert_close(a[name], b[name], **TOLERANCE, msg=lambda text, name=name: f"{name}: {text}")


def test_two_processes_equal_one_with_accumulation_and_resume_on_one(tiny_pair, tmp_path):
    two = tmp_path / "two"
    context, port = multiprocessing.get_context("fork"), free_port()
    errors = context.Queue()
    workers = [context.Process(target=interrupted_after_two_steps, args=(config(tiny_pair), two, rank, port, errors)) for rank in (0, 1)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert errors.empty(), errors.get()
    assert [worker.exitcode for worker in workers] == [0, 0]
    checkpoint = two / "checkpoints" / "step-00000002"
    assert json.loads((checkpoint / "layout.json").read_text()) == {"processes": 2, "engine": "MULTI_CPU"}

    # Parity: 2 processes x 1 micro-batch of 2 == 1 process x 2 micro-batches of 2 (same global batch).
    one = run_distill(config(tiny_pair, grad_accum=2), tmp_path / "one")
    reference = student_at(one / "checkpoints" / "step-00000002")
    assert_close(student_at(checkpoint), reference)
    start = load_file(str(tiny_pair[1] / "model.safetensors"))
    assert not torch.allclose(reference["transformer.h.0.mlp.c_fc.weight"], start["transformer.h.0.mlp.c_fc.weight"])

    # The 2-process checkpoint resumes on 1 process (DDP checkpoints hold whole tensors) to step 4.
    resumed = run_distill(config(tiny_pair), two, resume=True)
    assert_close(load_file(str(resumed / "student" / "model.safetensors")), load_file(str(one / "student" / "model.safetensors")))
    assert json.loads((resumed / "manifest.json").read_text())["processes"] == 1


def test_sharded_checkpoints_resume_only_under_the_launch_that_wrote_them(tmp_path):
    Layout(processes=2, engine="FSDP").write(tmp_path)
    check_resumable(tmp_path, Layout(processes=2, engine="FSDP"))
    for now in (Layout(1, "NO"), Layout(4, "FSDP"), Layout(2, "DEEPSPEED")):
        with pytest.raises(UsageError, match="written by 2 FSDP process.*sharded checkpoints resume only"):
            check_resumable(tmp_path, now)
    Layout(processes=2, engine="MULTI_GPU").write(tmp_path)
    check_resumable(tmp_path, Layout(processes=8, engine="MULTI_GPU"))
    with pytest.raises(UsageError, match="2 MULTI_GPU .* 2 DEEPSPEED"):
        check_resumable(tmp_path, Layout(2, "DEEPSPEED"))


@pytest.mark.parametrize(
    ("environment", "message"),
    [
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, "the launch's engine cannot start: DeepSpeed is not installed"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, "FSDP needs CUDA devices"),
    ],
)
def test_a_launch_this_machine_cannot_run_is_one_line(tiny_pair, tmp_path, monkeypatch, environment, message):
    pytest.importorskip("accelerate")
    if "DEEPSPEED" in str(environment):
        from accelerate.utils import is_deepspeed_available

        if is_deepspeed_available():
            pytest.skip("deepspeed is installed here")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(SETTINGS))
    teacher, student = (str(path) for path in tiny_pair)
    result = CliRunner().invoke(app, ["distill", "--recipe", str(recipe), "--teacher", teacher, "--student", student, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.parametrize(("name", "engine"), [("ddp", "MULTI_GPU"), ("fsdp2", "FSDP"), ("zero2", "DEEPSPEED"), ("zero3", "DEEPSPEED")])
def test_shipped_launch_configs_are_what_accelerate_launch_reads(name, engine):
    """What Accelerate's launcher makes of each shipped file (the GPU and DeepSpeed runs themselves are untested here)."""
    from importlib import resources

    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    path = resources.files("mgsr_cli.recipes") / "accelerate" / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "--num_processes", "2", "-m", "mgsr_cli.cli", "distill"])
    args, defaults, _ = _validate_launch_command(args)
    assert defaults.distributed_type.value == engine and args.num_processes == 2
    if engine == "FSDP":
        launched = prepare_multi_gpu_env(args)
        assert (launched["FSDP_VERSION"], launched["FSDP_AUTO_WRAP_POLICY"]) == ("2", "TRANSFORMER_BASED_WRAP")
        assert launched["FSDP_STATE_DICT_TYPE"] == "SHARDED_STATE_DICT"
    if engine == "DEEPSPEED":
        stage = int(name[-1])
        assert defaults.deepspeed_config["zero_stage"] == stage and defaults.deepspeed_config["gradient_accumulation_steps"] == 1
        assert defaults.deepspeed_config.get("zero3_save_16bit_model", False) == (stage == 3)
