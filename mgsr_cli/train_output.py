"""Everything `distill` writes under OUT: the manifest and metrics.jsonl, checkpoints (and resuming
from them), `best/` and `last/` students, and at the end `student/`, config.yaml and the loss curve."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from torch import nn

from mgsr_cli.artifacts import StageWriter, atomic_write_text, describe_input
from mgsr_cli.checkpoints import TrainState, latest_checkpoint, save_checkpoint
from mgsr_cli.config import DistillConfig
from mgsr_cli.config_loading import to_dict
from mgsr_cli.data import resolve_source
from mgsr_cli.distributed import Layout, check_resumable, student_state_dict
from mgsr_cli.errors import UsageError
from mgsr_cli.lora import merged_student
from mgsr_cli.models import tokenizer_fingerprint

log = logging.getLogger(__name__)


class RunOutput:
    """The output directory of one run; the manifest and metrics are written by the main process only."""

    def __init__(self, config: DistillConfig, out_dir: Path, accelerator, tokenizer, prompts: dict, static: bool, resume: bool, overwrite: bool):
        """`prompts`: how prompts were rendered (`Rendering.describe()`); `static`: the run reads sgo_data."""
        self.config, self.out_dir, self.accelerator, self.tokenizer, self.prompts = config, out_dir, accelerator, tokenizer, prompts
        self.static = static
        checkpoint = latest_checkpoint(out_dir)
        self.checkpoint_to_resume = checkpoint if resume else None
        self.writer = self._open(checkpoint, resume, overwrite) if accelerator.is_main_process else None
        accelerator.wait_for_everyone()

    def _open(self, checkpoint: Path | None, resume: bool, overwrite: bool) -> StageWriter:
        config, out_dir = self.config, self.out_dir
        manifest_path = out_dir / "manifest.json"
        unfinished = manifest_path.exists() and '"status": "running"' in manifest_path.read_text()
        if unfinished and not resume and not overwrite and checkpoint is not None:
            raise UsageError(f"'{out_dir}' holds an unfinished distill run; pass --resume to continue it or --overwrite to restart")
        if resume and checkpoint is None:
            log.warning("--resume: '%s' holds no checkpoint yet; starting from step 0", out_dir)
        return StageWriter.open(
            out_dir,
            stage="distill",
            config=to_dict(config),
            inputs=self._inputs(),
            models={"teacher": config.teacher, "student": config.student},
            tokenizer=tokenizer_fingerprint(self.tokenizer),
            overwrite=overwrite,
            records_name="metrics.jsonl",
            progress=checkpoint is not None,  # metrics without a checkpoint are redone from step 0
            prompts=self.prompts,
        )

    def _inputs(self) -> dict[str, dict]:
        """Every data input the run reads, for the manifest and for keeping --out apart from them."""
        config = self.config
        inputs = {"data": describe_input(config.data, resolve_source(config.data))}
        if config.dev_data:
            inputs["dev_data"] = describe_input(config.dev_data, resolve_source(config.dev_data))
        if self.static and config.sgo_data:
            inputs["sgo_data"] = describe_input(config.sgo_data, Path(config.sgo_data))
        return inputs

    def resume(self, state: TrainState) -> None:
        """Loads the latest checkpoint (when resuming and there is one) into everything registered with
        the accelerator, `state` included, and drops the metric lines written after it."""
        checkpoint = self.checkpoint_to_resume
        if checkpoint is None:
            return
        check_resumable(checkpoint, Layout.of(self.accelerator))
        self.accelerator.load_state(str(checkpoint))
        if self.writer is not None:
            _truncate_metrics(self.writer.records_path, state.step)
        log.info("resumed from %s at step %d", checkpoint.name, state.step)

    def log(self, step: int, record: dict) -> None:
        if self.writer is not None:
            self.writer.append([{"step": step, **record}])

    def checkpoint(self, step: int) -> Path:
        return save_checkpoint(self.accelerator, self.out_dir, step, self.config.keep_checkpoints)

    def save_student(self, module: nn.Module, target: Path) -> None:
        """The student of the prepared DistillModule `module`: save_pretrained (safetensors) + tokenizer,
        written beside `target` and renamed into place; with LoRA, the merged student (and the
        adapters alone in adapter/ with lora.export_adapter)."""
        self.accelerator.wait_for_everyone()
        state = student_state_dict(self.accelerator, module)  # whole tensors under FSDP / ZeRO-3 too
        if self.accelerator.is_main_process:
            student = self.accelerator.unwrap_model(module).student
            temporary = target.with_name(f".tmp-{target.name}")
            shutil.rmtree(temporary, ignore_errors=True)
            if self.config.lora.enabled:
                adapter_dir = temporary / "adapter" if self.config.lora.export_adapter else None
                merged_student(student, self.config, state, adapter_dir).save_pretrained(str(temporary), safe_serialization=True)
            else:
                student.save_pretrained(str(temporary), state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(str(temporary))
            shutil.rmtree(target, ignore_errors=True)
            temporary.rename(target)
        self.accelerator.wait_for_everyone()

    def finish(self, module: nn.Module, state: TrainState, last_metrics: dict) -> None:
        """Final student in OUT/student (the best validation step when ROUGE-L selects, else the last)."""
        self.checkpoint(state.step)
        best = self.out_dir / "best"
        selected = "best" if self.config.eval_rouge and state.best_step is not None else "last"
        self.save_student(module, self.out_dir / "last")
        if not self.accelerator.is_main_process:
            return
        student_dir = self.out_dir / "student"
        shutil.rmtree(student_dir, ignore_errors=True)
        if selected == "best":
            best.rename(student_dir)
        else:
            (self.out_dir / "last").rename(student_dir)
            shutil.rmtree(best, ignore_errors=True)
        import yaml

        atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(to_dict(self.config), sort_keys=False))
        from mgsr_cli.plots import plot_training

        plot_training(self.writer.records_path, self.out_dir / "loss_curve.png")
        self.writer.complete(
            steps=state.step,
            selected=selected,
            best_step=state.best_step,
            best_val_rougeL=state.best_score,
            sgo_steps=state.sgo.sgo_steps,
            processes=self.accelerator.num_processes,
            # Training autocasts (see train_setup.mixed_precision); the weights it updates and saves stay float32.
            training_precision=self.accelerator.mixed_precision,
            student_dtype=str(self.accelerator.unwrap_model(module).student.dtype).removeprefix("torch."),
            theta=state.sgo.theta,
            final=last_metrics,
        )


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again)."""
    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
