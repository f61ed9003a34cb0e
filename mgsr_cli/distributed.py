"""`distill` under `accelerate launch`: DDP, FSDP2 or DeepSpeed ZeRO-2/3 (recipes/accelerate/).

Accelerate is the engine; this module holds what the training loop must know about it: the
Accelerator, in one line when the launch's engine cannot start; which settings a sharded engine
cannot run; the whole student gathered for saving; and which checkpoints resume on another
world size (DDP's hold whole tensors and do; FSDP's and DeepSpeed's are sharded and are
refused in one line before anything is loaded).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from mgsr_cli.errors import UsageError

LAYOUT = "layout.json"
SHARDED_ENGINES = ("FSDP", "DEEPSPEED")


def make_accelerator(cpu: bool, mixed_precision: str):
    """A fresh Accelerator (one process may run several distills: demo, lab, tests)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # Accelerate refuses a second precision otherwise; the process group stays
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
    except ImportError as error:  # a DeepSpeed launch without deepspeed installed
        raise UsageError(f"the launch's engine cannot start: {str(error).splitlines()[0]}") from None
    if cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UsageError(
            "FSDP needs CUDA devices (Accelerate runs a CPU launch as DDP): on the CPU launch with recipes/accelerate/ddp.yaml"
        )
    return accelerator


def engine(accelerator) -> str:
    """'NO', 'MULTI_CPU', 'MULTI_GPU' (DDP), 'FSDP' or 'DEEPSPEED'."""
    return accelerator.distributed_type.value


def zero_stage(accelerator) -> int | None:
    plugin = accelerator.state.deepspeed_plugin if engine(accelerator) == "DEEPSPEED" else None
    return None if plugin is None else int(plugin.zero_stage)


def parameters_partitioned(accelerator) -> bool:
    """FSDP and ZeRO-3 keep a shard of each weight per process: the model runs whole only
    through the prepared module's own forward."""
    return engine(accelerator) == "FSDP" or zero_stage(accelerator) == 3


def check_supported(accelerator, samples_in_training: bool, grad_accum: int) -> None:
    """What a sharded engine cannot run here, refused before any model is prepared."""
    if samples_in_training and parameters_partitioned(accelerator):
        raise UsageError(
            f"sampling inside distill (SGO, eval_rouge) needs whole weights; {engine(accelerator)} partitions them: "
            "use recipes/accelerate/ddp.yaml or zero2.yaml, or sample beforehand with `mgsr generate` and sgo_policy static"
        )
    if grad_accum > 1 and engine(accelerator) == "DEEPSPEED":
        raise UsageError("under DeepSpeed grad_accum must be 1 (its engine steps at every backward): raise batch_size or the process count")


def share_output_layer(module: nn.Module, student: nn.Module, accelerator) -> None:
    """ZeRO-3 gathers a weight only inside its own module's forward; the loss reads the student's
    output layer from DistillModule.forward, so it is registered there (DeepSpeed's own API)."""
    if zero_stage(accelerator) == 3:
        import deepspeed

        deepspeed.zero.register_external_parameter(module, student.get_output_embeddings().weight)


def student_state_dict(accelerator, module: nn.Module) -> dict:
    """The student's whole tensors on the main process (a collective: every process calls it)."""
    state = accelerator.get_state_dict(module)
    return {name.removeprefix("student."): tensor for name, tensor in (state or {}).items() if name.startswith("student.")}


@dataclass(frozen=True)
class Layout:
    """How a checkpoint was written: by how many processes, under which engine."""

    processes: int
    engine: str

    @property
    def sharded(self) -> bool:
        return self.engine in SHARDED_ENGINES

    @classmethod
    def of(cls, accelerator) -> "Layout":
        return cls(processes=accelerator.num_processes, engine=engine(accelerator))

    def write(self, checkpoint: Path) -> None:
        (checkpoint / LAYOUT).write_text(json.dumps(asdict(self)) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, checkpoint: Path) -> "Layout":
        path = checkpoint / LAYOUT
        if not path.exists():  # written before layouts were recorded: whole tensors (DDP or one process)
            return cls(processes=1, engine="NO")
        return cls(**json.loads(path.read_text(encoding="utf-8")))


def check_resumable(checkpoint: Path, now: Layout) -> None:
    """Whole-tensor checkpoints resume on any world size; sharded ones only as they were written."""
    then = Layout.read(checkpoint)
    if (then.sharded or now.sharded) and then != now:
        raise UsageError(
            f"checkpoint '{checkpoint}' was written by {then.processes} {then.engine} process(es) and this run is "
            f"{now.processes} {now.engine} process(es): sharded checkpoints resume only under the launch that wrote them"
        )
