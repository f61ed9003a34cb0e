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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from mgsr_cli.artifacts import StageWriter, atomic_write_text, describe_input, iter_records, read_manifest
from mgsr_cli.batches import Batch, Sequence, SpanSettings, collate, ground_truth_sequences, make_sequence
from mgsr_cli.chat import recorded_renderings, resolve, template_sha256
from mgsr_cli.checkpoints import TrainState, latest_checkpoint, save_checkpoint
from mgsr_cli.config import DistillConfig, to_dict
from mgsr_cli.console import console, progress_bar
from mgsr_cli.data import load_examples, resolve_source
from mgsr_cli.distributed import Layout, check_resumable, check_supported, make_accelerator, share_output_layer, student_state_dict
from mgsr_cli.errors import Interrupted, UsageError
from mgsr_cli.gradient_probe import probe_gradient_shares
from mgsr_cli.heads import HeadLossInputs, fused_head_loss, hidden_states
from mgsr_cli.metrics import rouge_l_max
from mgsr_cli.models import check_same_vocabulary, load_model, load_tokenizer, resolve_dtype, tokenizer_fingerprint
from mgsr_cli.preflight import preflight
from mgsr_cli.sampling import TokenSpace, batch_seed, make_generator, sample
from mgsr_cli.sgo import Policy, SgoMaker, SgoState, choose_source, remember, replay, step_random, update_theta

log = logging.getLogger(__name__)
ONE_BILLION = 1_000_000_000


class TrainingError(UsageError):
    """Training cannot go on (non-finite loss): reported in one line, after a checkpoint."""


@dataclass
class Part:
    """One batch and the objective scored on it, with the global counts its means divide by."""

    batch: Batch
    objective: nn.Module
    teacher_hidden: Tensor | None
    token_count: int
    pair_count: int


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


@dataclass
class Objectives:
    """The loss spec split by the batch each term reads: `sft` on the ground truth (unless
    sft_on_sgo), the distillation terms on the batch the SGO scheduler picks."""

    sft: nn.Module | None
    distill: nn.Module | None
    needs_teacher: bool

    def combined(self) -> nn.Module:
        from mgsr_cli.losses import Objective

        present = [objective for objective in (self.sft, self.distill) if objective is not None]
        if len(present) == 1:
            return present[0]
        return Objective(self.sft.weighted_terms + self.distill.weighted_terms, temperature=self.distill.temperature)


def build_objectives(config: DistillConfig) -> Objectives:
    from mgsr_cli.losses import build_loss, parse_spec

    try:
        specs = parse_spec(config.loss)

        def build(items) -> nn.Module | None:
            if not items:
                return None
            text = ",".join(f"{item.name}{':' + item.param if item.param else ''}={item.weight:g}" for item in items)
            return build_loss(text, temperature=config.temperature, **config.loss_options)

        sft = build([item for item in specs if item.name == "sft"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)  # the DAC sub-network's initial weights: part of the run's seed
            distill = build([item for item in specs if item.name != "sft"])
        build_loss(config.loss, temperature=config.temperature, **config.loss_options)  # validates every option
    except ValueError as error:
        raise UsageError(f"loss '{config.loss}': {error}") from None
    return Objectives(sft=sft, distill=distill, needs_teacher=distill is not None)


# ---------------------------------------------------------------- setup


def check_lengths(model, name: str, max_length: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max_length > limit:
        raise UsageError(f"max_length {max_length} exceeds {name}'s {limit} positions; lower --max-length")


def resolve_schedule(config: DistillConfig, student: nn.Module, examples: int) -> tuple[float, int]:
    """(learning rate, total optimizer steps), filling method.md section 7's size-dependent defaults."""
    parameters = sum(parameter.numel() for parameter in student.parameters())
    lr = config.lr if config.lr is not None else (5e-4 if parameters < ONE_BILLION else 5e-5)
    if config.max_steps is not None:
        return lr, config.max_steps
    epochs = config.epochs if config.epochs is not None else (20 if parameters < ONE_BILLION else 10)
    return lr, epochs * math.ceil(examples / config.batch_size)


def cosine_schedule(optimizer, lr: float, min_lr: float, warmup: int, total: int):
    """Linear warmup, then cosine decay from lr to min_lr (the papers' schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return (min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))) / lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def param_groups(student: nn.Module, objectives: nn.ModuleDict, config: DistillConfig, lr: float) -> list[dict]:
    """Weight decay on matrices only; DAC-KL's sub-network in its own group (method.md §2)."""
    decay, no_decay = [], []
    for parameter in student.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "lr": lr, "weight_decay": config.weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    sub_network = [parameter for parameter in objectives.parameters() if parameter.requires_grad]
    if sub_network:
        groups.append({"params": sub_network, "lr": config.dac_lr, "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def prepare_student(student: nn.Module, config: DistillConfig) -> nn.Module:
    if config.disable_dropout:
        for module in student.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    if config.gradient_checkpointing:
        # transformers 5.x renamed it activation_checkpointing_enable (the old name warns, gone in v6).
        enable = getattr(student, "activation_checkpointing_enable", None) or student.gradient_checkpointing_enable
        enable()
        student.config.use_cache = False
    if config.lora.enabled:
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("lora.enabled needs peft: pip install 'mgsr[lora]'") from None
        with_lora(student, config)  # injects adapters into `student` in place and freezes the rest
    return student.train()


def lora_config(config: DistillConfig):
    """LoRA dropout follows `disable_dropout` like every other dropout of the student."""
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=0.0 if config.disable_dropout else config.lora.dropout,
        target_modules=config.lora.target_modules or None,
        task_type="CAUSAL_LM",
    )


def with_lora(model: nn.Module, config: DistillConfig):
    """get_peft_model, quietly: peft itself still calls transformers 5.x's deprecated is_gradient_checkpointing."""
    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora_config(config))


# peft injects the adapters into the student in place (no PeftModel wrapper survives), so their
# state-dict keys lack the prefix a PeftModel built around a fresh base expects.
PEFT_MODEL_PREFIX = "base_model.model."


def lora_adapted_copy(student: nn.Module, config: DistillConfig, state: dict):
    """A PeftModel around freshly loaded base weights carrying the trained adapters (from `state`,
    the student's whole tensors); refuses when any trained adapter tensor fails to land (a silent
    drop would export the untouched base)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    trained = get_peft_model_state_dict(student, state_dict=state)
    adapters = {PEFT_MODEL_PREFIX + name: tensor.detach().cpu() for name, tensor in trained.items()}
    base = load_model(config.student, torch.float32, torch.device("cpu"), config.trust_remote_code)
    wrapped = with_lora(base, config)
    result = set_peft_model_state_dict(wrapped, adapters)
    expected = set(get_peft_model_state_dict(wrapped))
    if result.unexpected_keys or expected != set(adapters):
        dropped = sorted(set(result.unexpected_keys) | (expected ^ set(adapters)))
        raise RuntimeError(f"LoRA export: {len(dropped)} adapter tensors do not match the base model (first: {dropped[0]})")
    return wrapped


# ---------------------------------------------------------------- the run


class Distillation:
    """Holds the run's models, data and state; `train()` is the loop."""

    def __init__(self, config: DistillConfig, out_dir: Path, resume: bool, overwrite: bool):
        self.config, self.out_dir = config, Path(out_dir)
        cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = make_accelerator(cpu, self._mixed_precision(cpu))
        self.device = self.accelerator.device
        self.policy = Policy.parse(config.sgo_policy)
        check_supported(self.accelerator, self.policy.generates or (config.eval_rouge and bool(config.dev_data)), config.grad_accum)
        self.objectives = build_objectives(config)
        self.combined = self.objectives.combined()
        self._load_tokenizers()
        self._load_data()  # before the models: bad data fails fast
        self._load_models()
        self.lr, self.total_steps = resolve_schedule(config, self.student, len(self.train_sequences))
        if self.total_steps < 1:
            raise UsageError("nothing to train: zero steps (check --max-steps / epochs and the data)")
        self.state = TrainState(sgo=SgoState(theta=config.theta_init))
        objective_modules = nn.ModuleDict(
            {name: objective for name, objective in (("sft", self.objectives.sft), ("distill", self.objectives.distill)) if objective is not None}
        )
        module = DistillModule(self.student, objective_modules, self.vocab_size, config.chunk_size)
        share_output_layer(module, self.student, self.accelerator)
        optimizer = torch.optim.AdamW(param_groups(self.student, objective_modules, config, self.lr))
        self.scheduler = cosine_schedule(optimizer, self.lr, config.min_lr, config.warmup_steps, self.total_steps)
        self.module, self.optimizer = self.accelerator.prepare(module, optimizer)
        self.accelerator.register_for_checkpointing(self.scheduler)
        self.accelerator.register_for_checkpointing(self.state)
        self.writer = self._open_output(resume, overwrite)
        self.stop_requested = 0  # the signal that asked for a stop

    def _mixed_precision(self, cpu: bool) -> str:
        """`--dtype` as Accelerate's autocast over fp32 master weights: bf16 and fp16 on CUDA, bf16 on
        the CPU too (torch's CPU autocast); fp16 on the CPU has no autocast and is refused."""
        dtype = resolve_dtype(self.config.dtype, torch.device("cpu" if cpu else "cuda"))
        if cpu and dtype == torch.float16:
            raise UsageError("--dtype float16 needs CUDA (the CPU autocasts to bfloat16 only): use --dtype bfloat16 or float32")
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "no")

    def _load_tokenizers(self) -> None:
        config = self.config
        if not config.teacher or not config.student:
            raise UsageError("distill needs --teacher and --student")
        self.tokenizer = load_tokenizer(config.student, config.trust_remote_code)
        teacher_tokenizer = load_tokenizer(config.teacher, config.trust_remote_code)
        check_same_vocabulary(teacher_tokenizer, self.tokenizer)
        self.teacher_template = template_sha256(teacher_tokenizer)
        self.vocab_size = len(self.tokenizer)

    def _load_models(self) -> None:
        config = self.config
        self.student = load_model(config.student, torch.float32, self.device, config.trust_remote_code)
        self.teacher = None
        if self._uses_teacher_model():
            teacher_dtype = resolve_dtype(config.teacher_dtype, self.device)
            self.teacher = load_model(config.teacher, teacher_dtype, self.device, config.trust_remote_code)
            self.teacher.requires_grad_(False)
        for model, name in ((self.student, "student"), (self.teacher, "teacher")):
            if model is not None:
                check_lengths(model, name, config.max_length)
        self.token_space = TokenSpace.of(self.student, self.tokenizer)
        preflight({"student": self.student, "teacher": self.teacher}, self.token_space, self.student if self.policy.generates and config.scrg else None)
        prepare_student(self.student, config)
        self.sgo_maker = SgoMaker(config, self.student, self.teacher, self.tokenizer, self.token_space, self._span_settings())

    def _uses_teacher_model(self) -> bool:
        """False for pure SFT on the ground truth: the teacher's weights are then never read."""
        samples_with_teacher = self.policy.generates and (self.config.scrg or self.config.sgo_model != "student")
        return self.objectives.needs_teacher or samples_with_teacher

    def _span_settings(self) -> SpanSettings | None:
        uses_span = self.objectives.distill is not None and self.objectives.distill.has_pair_terms
        return SpanSettings(self.config.span_prior, self.config.span_pairs) if uses_span else None

    def _load_data(self) -> None:
        config = self.config
        spans = self._span_settings()
        examples = load_examples(config.data, config.data_format, config.limit)
        self.dev_examples = load_examples(config.dev_data, config.data_format, config.dev_limit) if config.dev_data else []
        self._resolve_rendering(examples)

        def sequences(rows):
            return ground_truth_sequences(
                rows, self.tokenizer, config.data_format.max_prompt_length, config.max_length, spans, self.rendering, config.chat_turns
            )

        self.train_sequences = sequences(examples)
        if not self.train_sequences:
            raise UsageError(f"training data '{config.data}' holds no example with a reference response")
        self.dev_sequences = sequences(self.dev_examples) if self.dev_examples else []
        self.static_pool = self._load_static(spans) if self.policy.kind == "static" else {}

    def _resolve_rendering(self, examples) -> None:
        """One rendering for training, validation and SGO prompts (chat.py); the static SGO must share it.
        Prompts are rendered with the student's tokenizer; the teacher reads the same ids."""
        config = self.config
        chat_row = next((example for example in examples if example.is_chat and not example.references), None)
        if chat_row is not None:
            raise UsageError(f"{chat_row.where}: a 'messages' training row needs a final assistant turn (the response to train on)")
        inputs = [config.data, config.dev_data, config.sgo_data if self.policy.kind == "static" else None]
        self.rendering = resolve(
            config.data_format.chat_template, self.tokenizer, examples + self.dev_examples, recorded_renderings(inputs), config.student
        )
        if config.chat_turns == "all" and not self.rendering.chat_template:
            raise UsageError(
                "--chat-turns all trains assistant turns, but these prompts use the papers' template "
                "(instruction rows under --chat-template auto); pass --chat-template on"
            )
        if self.rendering.chat_template and self.teacher_template != self.rendering.template_sha256:
            log.warning("the teacher's chat template differs from the student's; prompts are rendered with the student's")

    def _load_static(self, spans: SpanSettings | None) -> dict[str, list[Sequence]]:
        if not self.config.sgo_data:
            raise UsageError("sgo_policy static needs --sgo-data: a generate or correct output directory")
        path = Path(self.config.sgo_data)
        read_manifest(path, ("generate", "correct"), tokenizer_fingerprint(self.tokenizer))
        pool: dict[str, list[Sequence]] = {}
        ground_truth = {sequence.example_id: sequence for sequence in self.train_sequences}
        for record in iter_records(path / "records.jsonl"):
            same_prompt = ground_truth.get(record["example_id"])
            trained = same_prompt.prompt_targets if same_prompt and same_prompt.prompt_ids == record["prompt_ids"] else ()  # chat_turns all
            response = record["response_ids"] or [self.tokenizer.eos_token_id]
            sequence = make_sequence(record["example_id"], record["prompt_ids"], response, self.tokenizer, spans, trained)
            pool.setdefault(record["example_id"], []).append(sequence)
        covered = sum(1 for sequence in self.train_sequences if sequence.example_id in pool)
        if covered == 0:
            raise UsageError(f"sgo_data '{path}' holds no outputs for the training examples (ids do not match)")
        if covered < len(self.train_sequences):
            log.warning("sgo_data covers %d of %d training examples; the rest train on ground truth", covered, len(self.train_sequences))
        return pool

    def _inputs(self) -> dict[str, dict]:
        """Every data input the run reads, for the manifest and for keeping --out apart from them."""
        config = self.config
        inputs = {"data": describe_input(config.data, resolve_source(config.data))}
        if config.dev_data:
            inputs["dev_data"] = describe_input(config.dev_data, resolve_source(config.dev_data))
        if self.policy.kind == "static" and config.sgo_data:
            inputs["sgo_data"] = describe_input(config.sgo_data, Path(config.sgo_data))
        return inputs

    def _open_output(self, resume: bool, overwrite: bool) -> StageWriter | None:
        config, out_dir = self.config, self.out_dir
        checkpoint = latest_checkpoint(out_dir)
        if self.accelerator.is_main_process:
            manifest_path = out_dir / "manifest.json"
            unfinished = manifest_path.exists() and '"status": "running"' in manifest_path.read_text()
            if unfinished and not resume and not overwrite and checkpoint is not None:
                raise UsageError(f"'{out_dir}' holds an unfinished distill run; pass --resume to continue it or --overwrite to restart")
            if resume and checkpoint is None:
                log.warning("--resume: '%s' holds no checkpoint yet; starting from step 0", out_dir)
        writer = None
        if self.accelerator.is_main_process:
            writer = StageWriter.open(
                out_dir,
                stage="distill",
                config=to_dict(config),
                inputs=self._inputs(),
                models={"teacher": config.teacher, "student": config.student},
                tokenizer=tokenizer_fingerprint(self.tokenizer),
                overwrite=overwrite,
                records_name="metrics.jsonl",
                progress=checkpoint is not None,  # metrics without a checkpoint are redone from step 0
                prompts=self.rendering.describe(),
            )
        self.accelerator.wait_for_everyone()
        if resume and checkpoint is not None:
            check_resumable(checkpoint, Layout.of(self.accelerator))
            self.accelerator.load_state(str(checkpoint))
            if writer is not None:
                _truncate_metrics(writer.records_path, self.state.step)
            log.info("resumed from %s at step %d", checkpoint.name, self.state.step)
        return writer

    # ------------------------------------------------------------ data for a step

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    def _check_batch_geometry(self) -> int:
        """Sequences per process per micro-batch; the global batch must split evenly."""
        share, remainder = divmod(self.config.batch_size, self.world * self.config.grad_accum)
        if remainder or share == 0:
            raise UsageError(
                f"batch_size {self.config.batch_size} does not split into {self.world} processes x {self.config.grad_accum} micro-batches"
            )
        return share

    def global_batch(self, step: int) -> list[Sequence]:
        """The step's ground-truth sequences: epoch-wise shuffles, fixed by (seed, step) alone."""
        size, count = self.config.batch_size, len(self.train_sequences)
        per_epoch = math.ceil(count / size)
        epoch, index = divmod(step, per_epoch)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(self.config.seed + epoch)).tolist()
        positions = [(index * size + offset) % count for offset in range(size)]
        return [self.train_sequences[order[position]] for position in positions]

    def micro_batches(self, step: int) -> list[list[Sequence]]:
        """This process's share of the global batch, cut into grad_accum micro-batches."""
        share = self._check_batch_geometry()
        per_process = share * self.config.grad_accum
        rank = self.accelerator.process_index
        mine = self.global_batch(step)[rank * per_process : (rank + 1) * per_process]
        return [mine[i * share : (i + 1) * share] for i in range(self.config.grad_accum)]

    def distill_sequences(self, source: str, micro: list[Sequence], generator: torch.Generator, rng) -> list[Sequence]:
        """The sequences the distillation terms see for one micro-batch, by SGO source."""
        state = self.state.sgo
        if source == "ground_truth":
            return micro
        if source == "fresh":
            made = self.sgo_maker.make(micro, generator)
            if self.policy.kind == "adaptive_off_policy":
                remember(state, made, self.config.replay_capacity)
            return made
        if source == "replay":
            return replay(state, len(micro), rng)
        if source == "static":
            return [rng.choice(self.static_pool[seq.example_id]) if seq.example_id in self.static_pool else seq for seq in micro]
        missing = [seq for seq in micro if seq.example_id not in state.memo]
        for made in self.sgo_maker.make(missing, generator) if missing else []:
            state.memo[made.example_id] = made
        return [state.memo[seq.example_id] for seq in micro]

    def _global_counts(self, batches: list[Batch]) -> tuple[int, int]:
        local = torch.tensor(
            [sum(batch.num_rows for batch in batches), sum(int(batch.pairs.shape[0]) for batch in batches)], device=self.device
        )
        total = self.accelerator.reduce(local, reduction="sum")
        return int(total[0]), int(total[1])

    @torch.no_grad()
    def teacher_rows(self, batch: Batch) -> Tensor:
        hidden, _ = hidden_states(self.teacher, batch.input_ids, batch.attention_mask)
        return hidden[batch.rows[:, 0], batch.rows[:, 1]]

    def plan_parts(self, ground_truth: list[list[Sequence]], distill: list[list[Sequence]]) -> list[list[Part]]:
        """Per micro-batch, the (batch, objective) parts to score, each with its global counts.

        One part when every term reads the same batch (the scheduler chose the ground truth,
        sft_on_sgo, or the spec has only sft or only distillation terms); else `sft` on the
        ground truth and the distillation terms on the generated batch.
        """
        objectives, pad = self.objectives, self.tokenizer.pad_token_id

        def collated(lists: list[list[Sequence]]) -> list[Batch]:
            return [collate(sequences, pad).to(self.device) for sequences in lists]

        same = all(d is g for d, g in zip(distill, ground_truth))
        if same or self.config.sft_on_sgo or objectives.sft is None or objectives.distill is None:
            reads_ground_truth = objectives.distill is None and not self.config.sft_on_sgo
            batches = collated(ground_truth if reads_ground_truth else distill)
            tokens, pairs = self._global_counts(batches)
            return [[Part(batch, self.combined, self._teacher_for(batch), tokens, pairs)] for batch in batches]
        gt_batches, sgo_batches = collated(ground_truth), collated(distill)
        gt_tokens, _ = self._global_counts(gt_batches)
        tokens, pairs = self._global_counts(sgo_batches)
        return [
            [Part(gt, objectives.sft, None, gt_tokens, 0), Part(sgo, objectives.distill, self._teacher_for(sgo), tokens, pairs)]
            for gt, sgo in zip(gt_batches, sgo_batches)
        ]

    def _teacher_for(self, batch: Batch) -> Tensor | None:
        return self.teacher_rows(batch) if self.objectives.needs_teacher else None

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, step: int) -> dict:
        """Forward/backward over this process's micro-batches, then one AdamW step."""
        config, accelerator = self.config, self.accelerator
        rank = accelerator.process_index
        torch.manual_seed(batch_seed(config.seed, step * self.world + rank))  # anything stochastic in the student
        generator = make_generator(batch_seed(config.seed + 1, step * self.world + rank), self.device)
        rng = step_random(config.seed + rank, step)
        source = choose_source(self.policy, self.state.sgo, config, step, self.total_steps)
        ground_truth = self.micro_batches(step)
        distill = [self.distill_sequences(source, micro, generator, rng) for micro in ground_truth]
        parts_per_micro = self.plan_parts(ground_truth, distill)
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

    def _stop_if_not_finite(self, loss: Tensor, scores, step: int) -> None:
        """A NaN/inf loss stops the run, on every process, after saving the last good state."""
        bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=self.device)
        if float(self.accelerator.reduce(bad, reduction="sum")) == 0:
            return
        terms = sorted({name for score in scores for name, value in score.terms.items() if not math.isfinite(float(value))})
        checkpoint = save_checkpoint(self.accelerator, self.out_dir, self.state.step, self.config.keep_checkpoints)
        raise TrainingError(
            f"non-finite loss at step {step + 1} (term {', '.join(terms) or 'unknown'}); "
            f"the last good state is saved in {checkpoint}; lower the learning rate or check the data"
        )

    # ------------------------------------------------------------ validation

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The whole objective on the dev ground truth, as one token-weighted mean."""
        if not self.dev_sequences:
            return float("nan")
        mine = self.dev_sequences[self.accelerator.process_index :: self.world]
        size = max(self.config.batch_size // self.world, 1)
        batches = [collate(mine[i : i + size], self.tokenizer.pad_token_id).to(self.device) for i in range(0, len(mine), size)]
        tokens, pairs = self._global_counts(batches)
        self.module.eval()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            with self.accelerator.autocast():
                loss, _ = self.module([Part(batch, self.combined, self._teacher_for(batch), tokens, pairs)], self.teacher)
            total += loss.float()
        self.module.train()
        return float(self.accelerator.reduce(total, reduction="sum"))

    @torch.no_grad()
    def validation_rouge(self) -> float:
        """Dev ROUGE-L x100 of sampled responses (fixed seeds, so steps are compared fairly)."""
        from mgsr_cli.data import tokenize_prompts

        prompts = tokenize_prompts(
            self.dev_examples[: self.config.eval_rouge_examples], self.tokenizer, self.config.data_format.max_prompt_length, self.rendering
        )
        mine = prompts[self.accelerator.process_index :: self.world]
        size = max(self.config.batch_size // self.world, 1)
        student = self.accelerator.unwrap_model(self.module).student
        student.eval()
        scores = []
        for start in range(0, len(mine), size):
            batch = mine[start : start + size]
            generator = make_generator(batch_seed(self.config.seed, start), self.device)
            output = sample(
                student, [list(p.prompt_ids) for p in batch], self.config.eval_sampling, generator, self.token_space
            )
            for row, prompt in enumerate(batch):
                text = self.tokenizer.decode(output.row(row), skip_special_tokens=True)
                scores.append(rouge_l_max(text, prompt.example.references))
        student.train()
        totals = self.accelerator.reduce(torch.tensor([sum(scores), len(scores)], device=self.device, dtype=torch.float64), reduction="sum")
        return 100.0 * float(totals[0]) / max(float(totals[1]), 1.0)

    def validate(self) -> dict:
        metrics = {"val_loss": self.validation_loss()}
        if self.config.eval_rouge and self.dev_examples:
            metrics["val_rougeL"] = self.validation_rouge()
        if math.isfinite(metrics["val_loss"]):
            update_theta(self.state.sgo, metrics["val_loss"], self.config)
        metrics["theta"] = self.state.sgo.theta
        score = metrics.get("val_rougeL")
        if score is not None and (self.state.best_score is None or score > self.state.best_score):
            self.state.best_score, self.state.best_step = score, self.state.step
            self.save_student(self.out_dir / "best")
        return metrics

    # ------------------------------------------------------------ output

    def save_student(self, target: Path) -> None:
        """save_pretrained (safetensors) + tokenizer, written beside `target` and renamed into place."""
        self.accelerator.wait_for_everyone()
        state = student_state_dict(self.accelerator, self.module)  # whole tensors under FSDP / ZeRO-3 too
        if self.accelerator.is_main_process:
            import shutil

            student = self.accelerator.unwrap_model(self.module).student
            temporary = target.with_name(f".tmp-{target.name}")
            shutil.rmtree(temporary, ignore_errors=True)
            if self.config.lora.enabled:
                adapted = lora_adapted_copy(student, self.config, state)
                if self.config.lora.export_adapter:
                    adapted.save_pretrained(str(temporary / "adapter"), safe_serialization=True)
                adapted.merge_and_unload().save_pretrained(str(temporary), safe_serialization=True)
            else:
                student.save_pretrained(str(temporary), state_dict=state, safe_serialization=True)
            self.tokenizer.save_pretrained(str(temporary))
            shutil.rmtree(target, ignore_errors=True)
            temporary.rename(target)
        self.accelerator.wait_for_everyone()

    def log(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.append([{"step": self.state.step, **record}])

    def finish(self, last_metrics: dict) -> None:
        """Final student in OUT/student (the best validation step when ROUGE-L selects, else the last)."""
        import shutil

        save_checkpoint(self.accelerator, self.out_dir, self.state.step, self.config.keep_checkpoints)
        best = self.out_dir / "best"
        selected = "best" if self.config.eval_rouge and self.state.best_step is not None else "last"
        self.save_student(self.out_dir / "last")
        if self.accelerator.is_main_process:
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
                steps=self.state.step,
                selected=selected,
                best_step=self.state.best_step,
                best_val_rougeL=self.state.best_score,
                sgo_steps=self.state.sgo.sgo_steps,
                processes=self.world,
                # Training autocasts (see _mixed_precision); the weights it updates and saves stay float32.
                training_precision=self.accelerator.mixed_precision,
                student_dtype=str(self.accelerator.unwrap_model(self.module).student.dtype).removeprefix("torch."),
                theta=self.state.sgo.theta,
                final=last_metrics,
            )

    # ------------------------------------------------------------ the loop

    def train(self) -> Path:
        config = self.config
        previous_handlers = {signum: signal.signal(signum, self._request_stop) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            with progress_bar() as progress:
                task = progress.add_task("distill", total=self.total_steps, completed=self.state.step, info="", visible=self.accelerator.is_main_process)
                window_start, window_tokens, metrics, validated = time.perf_counter(), 0, {}, self.state.step
                while self.state.step < self.total_steps:
                    if self.stop_requested:
                        path = save_checkpoint(self.accelerator, self.out_dir, self.state.step, config.keep_checkpoints)
                        raise Interrupted(self.stop_requested, f"checkpoint of step {self.state.step} saved in {path}; continue with --resume")
                    metrics = self.train_step(self.state.step)
                    self.state.step += 1
                    window_tokens += metrics["tokens"]
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    metrics.update(tokens_per_s=rate, sgo_share=self.state.sgo.sgo_steps / self.state.step, theta=self.state.sgo.theta)
                    progress.update(task, completed=self.state.step, info=_progress_text(metrics))
                    if self.logs_at(self.state.step):
                        self.log(metrics)
                        window_start, window_tokens = time.perf_counter(), 0
                    if config.eval_every and self.state.step % config.eval_every == 0:
                        self.log(self.validate())
                        validated = self.state.step
                    if config.save_every and self.state.step % config.save_every == 0 and self.state.step < self.total_steps:
                        save_checkpoint(self.accelerator, self.out_dir, self.state.step, config.keep_checkpoints)
            if validated != self.state.step and config.dev_data:
                self.log(self.validate())
            self.finish({key: value for key, value in metrics.items() if isinstance(value, (int, float))})
        finally:
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
        return self.out_dir

    def _request_stop(self, signum, frame) -> None:
        """First Ctrl-C or SIGTERM: finish the current step, save, stop. A second one stops at once."""
        if self.stop_requested:
            raise Interrupted(signum, "the last checkpoint is kept; continue with --resume")
        self.stop_requested = signum


def _progress_text(metrics: dict) -> str:
    terms = " ".join(f"{name} {value:.3g}" for name, value in metrics.items() if name in ("sft", "fkl", "rkl", "dac_kl", "span", "js", "tvd") or ":" in name)
    return f"loss {metrics['loss']:.4g} {terms} | {metrics['tokens_per_s']:,.0f} tok/s | SGO {metrics['sgo_share']:.0%}"


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop metric lines written after the checkpoint (they will be written again)."""
    import json

    kept = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


def run_distill(config: DistillConfig, out_dir: Path, resume: bool = False, overwrite: bool = False) -> Path:
    """Train the student as `config` says and write OUT/student, metrics, curves and checkpoints."""
    if resume and overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    return Distillation(config, out_dir, resume, overwrite).train()
