"""The `distill` stage: one readable training loop for MGSR and every baseline (method.md section 4).

A step: pick this step's global batch of ground-truth sequences; ask the SGO scheduler which
data the distillation terms see (ground truth, fresh student outputs revised by SCRG, a
replay, static outputs from disk); run the student (and the teacher, without grad) to their
final hidden states; score only the response rows through the output layer in chunks
(`heads.fused_head_loss`); backward; clip; AdamW step. Validation drives the adaptive
scheduler's θ and, with `eval_rouge`, picks the best step by dev ROUGE-L.

Runs under Accelerate: `accelerate launch --config_file recipes/accelerate/<engine>.yaml -m
mgsr_cli.cli distill ...` gives DDP, FSDP2 or DeepSpeed ZeRO-2/3 (mgsr_cli/distributed.py says
what each needs). Loss means are over the tokens of the whole global batch (all processes and
micro-batches), so one process and N processes compute the same loss.

Around the loop: `train_setup` (objectives, precision, models, optimizer groups, schedule),
`lora`, `train_data` (data and each step's batches), `train_validation`, `train_output`
(manifest, metrics, checkpoints, the exported student).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from mgsr_cli.batches import SpanSettings
from mgsr_cli.checkpoints import TrainState
from mgsr_cli.config import DistillConfig
from mgsr_cli.console import progress_bar
from mgsr_cli.distributed import check_supported, make_accelerator, share_output_layer
from mgsr_cli.errors import Interrupted, UsageError
from mgsr_cli.gradient_probe import probe_gradient_shares
from mgsr_cli.heads import HeadLossInputs, fused_head_loss, hidden_states
from mgsr_cli.preflight import preflight
from mgsr_cli.sampling import TokenSpace, batch_seed, make_generator
from mgsr_cli.sgo import Policy, SgoMaker, SgoState, choose_source, step_random, update_theta
from mgsr_cli.train_data import Part, StepBatches, load_training_data
from mgsr_cli.train_output import RunOutput
from mgsr_cli.train_setup import (
    build_objectives,
    cosine_schedule,
    load_models,
    load_shared_tokenizer,
    mixed_precision,
    param_groups,
    prepare_student,
    resolve_schedule,
)
from mgsr_cli.train_validation import validation_loss, validation_rouge


class TrainingError(UsageError):
    """Training cannot go on (non-finite loss): reported in one line, after a checkpoint."""


class DistillModule(nn.Module):
    """The student and the objectives' learnable parts (DAC-KL's f_sub) as one module, so that
    DDP synchronises and checkpoints save all of them together."""

    def __init__(self, student: nn.Module, objectives: nn.ModuleDict, vocab_size: int, chunk_size: int):
        super().__init__()
        self.student = student
        self.objectives = objectives
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        # FSDP2's transformer auto-wrap (Accelerate) reads the prepared module's _no_split_modules:
        # each decoder layer of the student becomes its own shard unit, the rest the root's.
        self._no_split_modules = getattr(student, "_no_split_modules", None)

    def forward(self, parts: list[Part], teacher: nn.Module | None):
        """Sum of every part's loss share; returns (loss, [HeadScore per part])."""
        total, scores = None, []
        for part in parts:
            hidden, _ = hidden_states(self.student, part.batch.input_ids, part.batch.attention_mask)
            rows = hidden[part.batch.rows[:, 0], part.batch.rows[:, 1]]
            inputs = HeadLossInputs(
                student=self.student,
                teacher=teacher,
                objective=part.objective,
                teacher_hidden=part.teacher_hidden,
                targets=part.batch.targets,
                pairs=part.batch.pairs,
                vocab_size=self.vocab_size,
                chunk_size=self.chunk_size,
                token_count=part.token_count,
                pair_count=part.pair_count,
            )
            loss = fused_head_loss(inputs, rows)
            total = loss if total is None else total + loss
            scores.append(inputs.score)
        return total, scores


class Distillation:
    """Holds the run's models, data and state; `train()` is the loop, `train_step()` one optimizer step."""

    def __init__(self, config: DistillConfig, out_dir: Path, resume: bool, overwrite: bool):
        self.config, self.out_dir = config, Path(out_dir)
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = make_accelerator(cpu, mixed_precision(config.dtype, cpu))
        self.device, self.world = self.accelerator.device, self.accelerator.num_processes
        self.policy = Policy.parse(config.sgo_policy)
        check_supported(self.accelerator, self.policy.generates or (config.eval_rouge and bool(config.dev_data)), config.grad_accum)
        self.objectives = build_objectives(config)
        self.tokenizer, teacher_template = load_shared_tokenizer(config)
        self.vocab_size = len(self.tokenizer)
        spans = self._span_settings()
        # before the models: bad data fails fast
        self.data = load_training_data(config, self.tokenizer, spans, self.policy.kind == "static", teacher_template)
        self._load_models(spans)
        self.lr, self.total_steps = resolve_schedule(config, self.student, len(self.data.train_sequences))
        if self.total_steps < 1:
            raise UsageError("nothing to train: zero steps (check --max-steps / epochs and the data)")
        self.state = TrainState(sgo=SgoState(theta=config.theta_init))
        objective_modules = self.objectives.as_module_dict()
        module = DistillModule(self.student, objective_modules, self.vocab_size, config.chunk_size)
        share_output_layer(module, self.student, self.accelerator)
        optimizer = torch.optim.AdamW(param_groups(self.student, objective_modules, config, self.lr))
        self.scheduler = cosine_schedule(optimizer, self.lr, config.min_lr, config.warmup_steps, self.total_steps)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.register_for_checkpointing(self.state)
        self.batches = StepBatches(config, self.accelerator, self.data, self.objectives, self.tokenizer, self.teacher, self.sgo_maker, self.policy)
        self.output = RunOutput(config, self.out_dir, self.accelerator, self.tokenizer, self.data.rendering.describe(), self.policy.kind == "static", resume, overwrite)
        self.output.resume(self.state)
        self.stop_requested = 0  # the signal that asked for a stop

    def _load_models(self, spans: SpanSettings | None) -> None:
        config = self.config
        self.student, self.teacher = load_models(config, self.device, with_teacher=self._uses_teacher_model())
        self.token_space = TokenSpace.of(self.student, self.tokenizer)
        preflight({"student": self.student, "teacher": self.teacher}, self.token_space, self.student if self.policy.generates and config.scrg else None)
        prepare_student(self.student, config)
        self.sgo_maker = SgoMaker(config, self.student, self.teacher, self.tokenizer, self.token_space, spans)

    def _uses_teacher_model(self) -> bool:
        """False for pure SFT on the ground truth: the teacher's weights are then never read."""
        samples_with_teacher = self.policy.generates and (self.config.scrg or self.config.sgo_model != "student")
        return self.objectives.needs_teacher or samples_with_teacher

    def _span_settings(self) -> SpanSettings | None:
        uses_span = self.objectives.distill is not None and self.objectives.distill.has_pair_terms
        return SpanSettings(self.config.span_prior, self.config.span_pairs) if uses_span else None

    @property
    def trained_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.module).student

    # ------------------------------------------------------------ the loop

    def train(self) -> Path:
        config, state = self.config, self.state
        previous_handlers = {signum: signal.signal(signum, self._request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with progress_bar() as progress:
                task = progress.add_task("distill", total=self.total_steps, completed=state.step, info="", visible=self.accelerator.is_main_process)
                window_start, window_tokens, metrics, validated = time.perf_counter(), 0, {}, state.step
                while state.step < self.total_steps:
                    if self.stop_requested:
                        path = self.output.checkpoint(state.step)
                        raise Interrupted(self.stop_requested, f"checkpoint of step {state.step} saved in {path}; continue with --resume")
                    metrics = self.train_step(state.step)
                    state.step += 1
                    window_tokens += metrics["tokens"]
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    metrics.update(tokens_per_s=rate, sgo_share=state.sgo.sgo_steps / state.step, theta=state.sgo.theta)
                    progress.update(task, completed=state.step, info=_progress_text(metrics))
                    if self.logs_at(state.step):
                        self.output.log(state.step, metrics)
                        window_start, window_tokens = time.perf_counter(), 0
                    if config.eval_every and state.step % config.eval_every == 0:
                        self.output.log(state.step, self.validate())
                        validated = state.step
                    if config.save_every and state.step % config.save_every == 0 and state.step < self.total_steps:
                        self.output.checkpoint(state.step)
            if validated != state.step and config.dev_data:
                self.output.log(state.step, self.validate())
            self.output.finish(self.module, state, {key: value for key, value in metrics.items() if isinstance(value, (int, float))})
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        return self.out_dir

    def train_step(self, step: int) -> dict:
        """Forward/backward over this process's micro-batches, then one AdamW step."""
        config, accelerator = self.config, self.accelerator
        rank = accelerator.process_index
        torch.manual_seed(batch_seed(config.seed, step * self.world + rank))  # anything stochastic in the student
        generator = make_generator(batch_seed(config.seed + 1, step * self.world + rank), self.device)
        rng = step_random(config.seed + rank, step)
        source = choose_source(self.policy, self.state.sgo, config, step, self.total_steps)
        ground_truth = self.batches.micro_batches(step)
        distill = [self.batches.distill_sequences(source, micro, self.state.sgo, generator, rng) for micro in ground_truth]
        parts_per_micro = self.batches.plan_parts(ground_truth, distill)
        self.module.train()
        totals: dict[str, float] = {}
        loss_sum, rows = 0.0, 0
        for index, parts in enumerate(parts_per_micro):
            last = index == len(parts_per_micro) - 1
            with accelerator.no_sync(self.module) if not last else contextlib.nullcontext(), accelerator.autocast():
                loss, scores = self.module(parts, self.teacher if self.objectives.needs_teacher else None)
                self._stop_if_not_finite(loss, scores, step)
                accelerator.backward(loss * self.world)  # DDP averages over processes; the counts are global
            loss_sum += float(loss.detach())
            rows += sum(part.batch.num_rows for part in parts)
            for part, score in zip(parts, scores):
                for name, value in {**score.terms, **score.stats}.items():
                    totals[name] = totals.get(name, 0.0) + float(value)
        shares = probe_gradient_shares(parts_per_micro[0], self.student, self.teacher, self.vocab_size) if self.logs_at(step + 1) else {}
        grad_norm = accelerator.clip_grad_norm_(self.module.parameters(), config.grad_clip) if config.grad_clip > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if source != "ground_truth":
            self.state.sgo.sgo_steps += 1
        reduced = accelerator.reduce(torch.tensor([loss_sum, rows, *totals.values()], device=self.device), reduction="sum")
        metrics = {"loss": float(reduced[0]), **{name: float(value) for name, value in zip(totals, reduced[2:])}}
        metrics.update(tokens=int(reduced[1]), source=source, lr=self.scheduler.get_last_lr()[0])
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return {**metrics, **shares}

    def logs_at(self, step: int) -> bool:
        """Whether metrics are written after `step` optimizer steps."""
        return step % self.config.log_every == 0 or step in (1, self.total_steps)

    def validate(self) -> dict:
        """Dev loss (which moves θ) and, with eval_rouge, dev ROUGE-L (a new best is saved to OUT/best)."""
        metrics = {"val_loss": validation_loss(self.module, self.batches, self.teacher, self.accelerator)}
        if self.config.eval_rouge and self.data.dev_examples:
            metrics["val_rougeL"] = validation_rouge(self.trained_student, self.data, self.tokenizer, self.token_space, self.config, self.accelerator)
        if math.isfinite(metrics["val_loss"]):
            update_theta(self.state.sgo, metrics["val_loss"], self.config)
        metrics["theta"] = self.state.sgo.theta
        score = metrics.get("val_rougeL")
        if score is not None and (self.state.best_score is None or score > self.state.best_score):
            self.state.best_score, self.state.best_step = score, self.state.step
            self.output.save_student(self.module, self.out_dir / "best")
        return metrics

    def _stop_if_not_finite(self, loss: Tensor, scores, step: int) -> None:
        """A NaN/inf loss stops the run, on every process, after saving the last good state."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if float(self.accelerator.reduce(bad, reduction="sum")) == 0:
            return
        terms = sorted({name for score in scores for name, value in score.terms.items() if not math.isfinite(float(value))})
        checkpoint = self.output.checkpoint(self.state.step)
        raise TrainingError(
            f"non-finite loss at step {step + 1} (term {', '.join(terms) or 'unknown'}); "
            f"the last good state is saved in {checkpoint}; lower the learning rate or check the data"
        )

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one stops at once."""
        if self.stop_requested:
            raise Interrupted(signum, "the last checkpoint is kept; continue with --resume")
        self.stop_requested = signum


def _progress_text(metrics: dict) -> str:
    terms = " ".join(f"{name} {value:.3g}" for name, value in metrics.items() if name in ("sft", "fkl", "rkl", "dac_kl", "span", "js", "tvd") or ":" in name)
    return f"loss {metrics['loss']:.4g} {terms} | {metrics['tokens_per_s']:,.0f} tok/s | SGO {metrics['sgo_share']:.0%}"


def run_distill(config: DistillConfig, out_dir: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the student as `config` says and write OUT/student, metrics, curves and checkpoints."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    return Distillation(config, out_dir, resume, overwrite).train()
