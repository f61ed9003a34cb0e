"""Crash-safe training checkpoints: written to a temporary directory, then renamed into place.

A checkpoint is Accelerate's state (student + DAC sub-network, optimizer, LR schedule, grad
scaler, RNG states) plus `TrainState` (step, SGO θ and replay buffer, best score) and its
`Layout` (process count and engine, checked on resume). The file
`checkpoints/latest` names the newest complete one; a crash while writing leaves only a
`.tmp-*` directory behind, which the next save removes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mgsr_cli.artifacts import atomic_write_text
from mgsr_cli.distributed import Layout
from mgsr_cli.errors import UsageError
from mgsr_cli.sgo import SgoState

LATEST = "latest"


@dataclass
class TrainState:
    """Everything about the run that is not a tensor of the model or optimizer."""

    step: int = 0
    sgo: SgoState = field(default_factory=lambda: SgoState(theta=0.0))
    best_score: float | None = None
    best_step: int | None = None

    def state_dict(self) -> dict:
        return {"step": self.step, "sgo": self.sgo, "best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.sgo = state["step"], state["sgo"]
        self.best_score, self.best_step = state["best_score"], state["best_step"]


def checkpoint_root(out_dir: Path) -> Path:
    return out_dir / "checkpoints"


def latest_checkpoint(out_dir: Path) -> Path | None:
    pointer = checkpoint_root(out_dir) / LATEST
    if not pointer.exists():
        return None
    path = checkpoint_root(out_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def save_checkpoint(accelerator, out_dir: Path, step: int, keep: int) -> Path:
    """Save Accelerate's registered state for `step`; every process must call this."""
    root = checkpoint_root(out_dir)
    final = root / f"step-{step:08d}"
    temporary = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary), safe_serialization=False)
        if accelerator.is_main_process:
            Layout.of(accelerator).write(temporary)
    except (OSError, RuntimeError) as error:  # a full disk reaches torch.save as either
        shutil.rmtree(temporary, ignore_errors=True)
        text = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise UsageError(f"cannot write checkpoint '{temporary}': {text}; the last complete checkpoint is kept") from None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        temporary.rename(final)
        atomic_write_text(root / LATEST, final.name + "\n")
        for old in sorted(root.glob("step-*"))[: -max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
