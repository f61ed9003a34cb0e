"""Training throughput and peak memory: `mgsr distill` vs TRL's GKDTrainer vs a naive full-logit loop.

All three train the same student against the same teacher (tiny GPT-2 pair, real 50,257-token
vocabulary, fp32 on the CPU, dropout off) on the same batches of shipped Dolly train examples
(the order mgsr's own loop draws, fed to the others in that order), with the same loss, AdamW,
gradient clipping 1.0 and number of optimizer steps:
- mgsr:  recipe kd (sgo_policy none) with loss fkl (beta 0) or gjsd:beta, run by mgsr's own
         `Distillation` loop (what `mgsr distill` / `run_distill` runs);
- trl:   `GKDTrainer` with lmbda=0 (no on-policy generation), seq_kd off, the same beta;
- naive: plain PyTorch: `model(input_ids).logits` [B, T, V] for student and teacher, the loss on
         the response positions, AdamW.

Every (variant, beta) run is a fresh process (started by this light, torch-free parent) and the
runs are interleaved A B C A B C. Time: the steady-state window from the end of optimizer step
`--warmup` to the end of the last step (model loading, the first steps and final saving are
outside it; data collation, forward, backward, optimizer and loop overhead are inside for all
three). Memory: the child's peak resident set (ru_maxrss from wait4, what `/usr/bin/time -v`
reports) and, from /proc/self/status, the resident size before step 1 and the high-water mark
over the training steps alone. The step-1 losses are compared to check the three compute the same
objective.

    PYTHONPATH=. python benchmarks/bench_distill.py --runs 3

`--recipes kd,mgsr,...` instead runs mgsr's own loop once per shipped recipe (its loss, loss
options and temperature; generation off: sgo_policy none), interleaved, on the same batches,
and reports each recipe's tokens/s and peak next to the floor: `floor`, the same teacher
forward (and projection) and student forward/backward with only `sft` as the loss.

    PYTHONPATH=. python benchmarks/bench_distill.py --recipes floor,kd,mgsr --runs 2 --steps 8

Needs the bench extra: pip install -e '.[bench]' (TRL).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from child_runs import emit_result, run_child  # noqa: E402

SCRIPT = Path(__file__).resolve()
VARIANTS = ("mgsr", "trl", "naive")


@dataclass
class Spec:
    """What one child process trains; the same spec (bar `variant`) gives the same work."""

    variant: str
    beta: float
    teacher: str
    student: str
    work_dir: str
    data: str = "dolly_train"
    limit: int | None = 400
    max_length: int = 320
    batch_size: int = 8
    steps: int = 5
    warmup: int = 2
    chunk_size: int = 512
    lr: float = 5e-4
    seed: int = 42
    threads: int = 2
    recipe: str | None = None  # variant mgsr only: a shipped recipe's loss instead of `loss_spec(beta)`


# ---------------------------------------------------------------- memory and timing (child side)


def proc_status_mib(name: str) -> float:
    """VmRSS / VmHWM of this process in MiB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(name + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_high_water_mark() -> bool:
    """Restart VmHWM at the current RSS, so the training peak excludes loading transients."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@dataclass
class Meter:
    """Step end times, token counts and memory marks of one training run."""

    steps: int
    warmup: int
    ends: list[float] = field(default_factory=list)
    cpu_ends: list[float] = field(default_factory=list)
    response_tokens: list[int] = field(default_factory=list)
    total_tokens: list[int] = field(default_factory=list)
    first_loss: float | None = None
    load_peak_mib: float = float("nan")
    ready_rss_mib: float = float("nan")
    train_peak_mib: float = float("nan")
    hwm_reset: bool = False
    load_average_start: float = float("nan")
    load_average_end: float = float("nan")

    def begin(self) -> None:
        """Call once, right before the first optimizer step (models and data loaded)."""
        self.load_peak_mib = proc_status_mib("VmHWM")
        self.ready_rss_mib = proc_status_mib("VmRSS")
        self.hwm_reset = reset_high_water_mark()

    def step_done(self, response_tokens: int, total_tokens: int) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())
        self.response_tokens.append(response_tokens)
        self.total_tokens.append(total_tokens)
        if len(self.ends) == self.warmup:
            self.load_average_start = os.getloadavg()[0]
        if len(self.ends) == self.steps:
            self.train_peak_mib = proc_status_mib("VmHWM")
            self.load_average_end = os.getloadavg()[0]

    def result(self) -> dict:
        if len(self.ends) != self.steps:
            raise RuntimeError(f"expected {self.steps} steps, timed {len(self.ends)}")
        seconds = self.ends[-1] - self.ends[self.warmup - 1]
        response = sum(self.response_tokens[self.warmup :])
        total = sum(self.total_tokens[self.warmup :])
        return {
            "window_s": seconds,
            "timed_steps": self.steps - self.warmup,
            "s_per_step": seconds / (self.steps - self.warmup),
            "cpu_s_per_step": (self.cpu_ends[-1] - self.cpu_ends[self.warmup - 1]) / (self.steps - self.warmup),
            "load_average": (self.load_average_start + self.load_average_end) / 2,
            "response_tokens": response,
            "total_tokens": total,
            "response_tok_s": response / seconds,
            "total_tok_s": total / seconds,
            "first_loss": self.first_loss,
            "load_peak_mib": self.load_peak_mib,
            "ready_rss_mib": self.ready_rss_mib,
            "train_peak_mib": self.train_peak_mib if self.hwm_reset else float("nan"),
            "step_times": [b - a for a, b in zip(self.ends[self.warmup - 1 :], self.ends[self.warmup :])],
        }


# ---------------------------------------------------------------- data (child side)


def training_batches(spec: Spec, tokenizer) -> list[list]:
    """The `spec.steps` global batches mgsr's loop trains on, in order (mgsr's own data path and
    its own epoch-wise shuffle, so every variant sees exactly these sequences)."""
    from mgsr_cli.batches import ground_truth_sequences
    from mgsr_cli.config import DataConfig
    from mgsr_cli.data import load_examples
    from mgsr_cli.train_data import global_batch

    data_format = DataConfig()
    examples = load_examples(spec.data, data_format, spec.limit)
    sequences = ground_truth_sequences(examples, tokenizer, data_format.max_prompt_length, spec.max_length, None)
    return [global_batch(sequences, spec.batch_size, spec.seed, step) for step in range(spec.steps)]


def batches_fingerprint(batches: list[list]) -> str:
    """A hash of every step's token ids: equal fingerprints mean identical training data."""
    digest = hashlib.sha256()
    for batch in batches:
        for sequence in batch:
            digest.update(json.dumps([sequence.prompt_ids, sequence.response_ids]).encode())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def token_counts(batch: list) -> tuple[int, int]:
    """(response tokens scored, prompt + response tokens) of one batch."""
    response = sum(len(sequence.response_ids) for sequence in batch)
    return response, response + sum(len(sequence.prompt_ids) for sequence in batch)


def loss_spec(beta: float) -> str:
    """mgsr's loss for GKD's beta: beta 0 is forward KL (the kd recipe's fkl)."""
    return "fkl" if beta == 0 else f"gjsd:{beta:g}"


# ---------------------------------------------------------------- the three variants (child side)


FLOOR = "floor"  # --recipes pseudo-recipe: sft as the only loss, with the teacher still run
OTHER_LOOPS = ("trl", "naive")  # --recipes pseudo-recipes: those loops' forward KL step (beta 0)


def recipe_base(recipe: str | None, beta: float) -> tuple[str, dict]:
    """(the shipped recipe one mgsr run starts from, its loss override): the recipe itself
    (loss, options, temperature, span settings), or kd's with `loss_spec(beta)` or the floor's sft."""
    if recipe is None:
        return "kd", {"loss": loss_spec(beta)}
    if recipe == FLOOR:
        return "kd", {"loss": "sft"}
    return recipe, {}


def recipe_loss(recipe: str) -> str:
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import load_recipe, recipe_path

    if recipe in OTHER_LOOPS:
        return f"{loss_spec(0.0)} ({'TRL GKDTrainer, beta 0' if recipe == 'trl' else 'plain full-logit loop'})"

    name, loss = recipe_base(recipe, 0.0)
    return loss.get("loss") or load_recipe(DistillConfig, recipe_path(name)).loss


def teacher_always(distillation_class) -> None:
    """Make the loop run the teacher (forward and projection) even when no term reads it: the floor."""
    module = sys.modules[distillation_class.__module__]
    original = module.build_objectives

    def with_teacher(config):
        objectives = original(config)
        objectives.needs_teacher = True
        return objectives

    module.build_objectives = with_teacher


def run_mgsr(spec: Spec, meter: Meter) -> dict:
    """mgsr's distill loop (what `run_distill` runs), with train_step timed from outside."""
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import load_recipe, override, recipe_path
    from mgsr_cli.train import Distillation
    from mgsr_cli.train_data import global_batch

    if spec.recipe == FLOOR:
        teacher_always(Distillation)
    recipe, loss = recipe_base(spec.recipe, spec.beta)
    config = override(
        load_recipe(DistillConfig, recipe_path(recipe)),
        {
            "teacher": spec.teacher,
            "student": spec.student,
            "data": spec.data,
            "limit": spec.limit,
            "dev_data": None,
            "max_length": spec.max_length,
            **loss,
            "sgo_policy": "none",
            "batch_size": spec.batch_size,
            "max_steps": spec.steps,
            "lr": spec.lr,
            "chunk_size": spec.chunk_size,
            "eval_every": 0,
            "save_every": 0,
            "log_every": spec.steps,
            "seed": spec.seed,
            "device": "cpu",
            "dtype": "float32",
            "teacher_dtype": "float32",
        },
    )
    distillation = Distillation(config, Path(spec.work_dir) / f"mgsr-out-{os.getpid()}", resume=False, overwrite=True)
    batches = [global_batch(distillation.data.train_sequences, config.batch_size, config.seed, step) for step in range(spec.steps)]
    counts = [token_counts(batch) for batch in batches]
    untimed_step = distillation.train_step

    def timed_step(step: int) -> dict:
        if step == 0:
            meter.begin()
        metrics = untimed_step(step)
        if step == 0:
            meter.first_loss = metrics["loss"]
        assert metrics["tokens"] == counts[step][0], "mgsr scored a different number of response tokens"
        meter.step_done(*counts[step])
        return metrics

    distillation.train_step = timed_step
    distillation.train()  # ends with checkpoint + save_pretrained, after the last timed step
    return {"fingerprint": batches_fingerprint(batches)}


def plain_divergence(student_logits, teacher_logits, beta: float):
    """Per-row generalized JSD (beta 0: forward KL(p_teacher || q_student)), written plainly."""
    import math

    import torch

    log_q = torch.log_softmax(student_logits, dim=-1)
    log_p = torch.log_softmax(teacher_logits, dim=-1)
    if beta == 0:
        return (log_p.exp() * (log_p - log_q)).sum(-1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * (log_p.exp() * (log_p - log_m)).sum(-1) + (1 - beta) * (log_q.exp() * (log_q - log_m)).sum(-1)


def load_student_teacher(spec: Spec):
    """Both models in fp32, dropout off in the student (train mode), teacher frozen in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(spec.student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(spec.teacher, dtype=torch.float32).eval().requires_grad_(False)
    for module in student.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return student.train(), teacher


def run_naive(spec: Spec, meter: Meter) -> dict:
    """The plain full-logit loop: [B, T, V] logits from both models, loss on the response rows."""
    import torch

    from mgsr_cli.batches import collate
    from mgsr_cli.models import load_tokenizer

    tokenizer = load_tokenizer(spec.student)
    batches = training_batches(spec, tokenizer)
    student, teacher = load_student_teacher(spec)
    decay = [p for p in student.parameters() if p.dim() >= 2]
    no_decay = [p for p in student.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=spec.lr)
    meter.begin()
    for step, sequences in enumerate(batches):
        batch = collate(sequences, tokenizer.pad_token_id)
        b, t = batch.rows[:, 0], batch.rows[:, 1]
        student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = plain_divergence(student_logits[b, t], teacher_logits[b, t], spec.beta).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0:
            meter.first_loss = float(loss)
        del student_logits, teacher_logits, loss
        meter.step_done(*token_counts(sequences))
    return {"fingerprint": batches_fingerprint(batches)}


def import_gkd():
    """GKDConfig, GKDTrainer: trl.experimental.gkd in current TRL."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    return GKDConfig, GKDTrainer


def run_trl(spec: Spec, meter: Meter) -> dict:
    """TRL's GKDTrainer, lmbda 0 (ground truth only), on the same batches in the same order."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from mgsr_cli.models import load_tokenizer

    GKDConfig, GKDTrainer = import_gkd()
    tokenizer = load_tokenizer(spec.student)
    batches = training_batches(spec, tokenizer)
    counts = [token_counts(batch) for batch in batches]
    # Prompt + the whole response; labels -100 on the prompt. GKD shifts by one itself, so the
    # scored (position, target) pairs are exactly mgsr's response rows.
    dataset = Dataset.from_list(
        [
            {"input_ids": s.prompt_ids + s.response_ids, "labels": [-100] * len(s.prompt_ids) + s.response_ids}
            for batch in batches
            for s in batch
        ]
    )
    pad_id = tokenizer.pad_token_id

    def pad_right(features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)
        input_ids = torch.full((len(features), width), pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done(*counts[len(meter.ends)])

    student, teacher = load_student_teacher(spec)
    args = GKDConfig(
        output_dir=str(Path(spec.work_dir) / f"trl-out-{os.getpid()}"),
        lmbda=0.0,
        beta=spec.beta,
        seq_kd=False,
        disable_dropout=True,
        per_device_train_batch_size=spec.batch_size,
        gradient_accumulation_steps=1,
        max_steps=spec.steps,
        max_length=spec.max_length,
        learning_rate=spec.lr,
        weight_decay=0.01,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_steps=spec.steps,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=spec.seed,
    )
    trainer = GKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        data_collator=pad_right,
        callbacks=[MeterCallback()],
    )
    first_batch = pad_right([dataset[row] for row in range(spec.batch_size)])["input_ids"]
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *rest, **kwargs):
        loss = compute_loss(model, inputs, *rest, **kwargs)
        if meter.first_loss is None:
            if not torch.equal(inputs["input_ids"], first_batch):
                raise RuntimeError("TRL's first batch differs from mgsr's (sampler order?)")
            meter.first_loss = float(loss[0] if isinstance(loss, tuple) else loss)
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    return {"fingerprint": batches_fingerprint(batches), "trl_version": trl.__version__}


def child_main(spec: Spec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    meter = Meter(spec.steps, spec.warmup)
    runner = {"mgsr": run_mgsr, "trl": run_trl, "naive": run_naive}[spec.variant]
    extra = runner(spec, meter)
    result = {**meter.result(), **extra, "end_peak_mib": proc_status_mib("VmHWM"), "torch": torch.__version__}
    emit_result(result)


def build_main(spec: Spec) -> None:
    """Build the tiny teacher/student pair (sizes in spec.teacher / spec.student as LxHxA)."""
    from mgsr_cli.models import TinySize, build_tiny_gpt2

    work = Path(spec.work_dir)
    for name, size, seed in (("teacher", spec.teacher, 0), ("student", spec.student, 1)):
        layers, width, heads = (int(part) for part in size.split("x"))
        build_tiny_gpt2(work / f"{name}-{size}", TinySize(n_layer=layers, n_embd=width, n_head=heads), seed)


# ---------------------------------------------------------------- parent side (no torch import)


def run_spec(spec: Spec, log_path: Path) -> dict:
    """One measured spec in a fresh bench_distill child."""
    return run_child(SCRIPT, "--child", dataclasses.asdict(spec), f"{spec.variant} beta={spec.beta}", log_path)


def available_gib() -> float:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def machine_description() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} x {model}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="interleaved repetitions of every (beta, variant)")
    parser.add_argument("--betas", default="0,0.5", help="GKD beta values (0 = forward KL = mgsr fkl)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--recipes", help=f"mgsr's loop per shipped recipe (and '{FLOOR}', 'trl', 'naive'), instead of the variants"
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument(
        "--max-length", type=int, default=320,
        help="prompt + response tokens at most (default 320: it must exceed the max prompt length, DataConfig's 256)",
    )
    parser.add_argument("--limit", type=int, default=400, help="Dolly train examples the batches are drawn from")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps")
    parser.add_argument("--chunk-size", type=int, default=512, help="mgsr's rows per output-layer chunk")
    parser.add_argument("--teacher-size", default="4x128x4", help="teacher layers x width x heads (default: the embedded pair)")
    parser.add_argument("--student-size", default="2x64x2", help="student layers x width x heads")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads per run")
    parser.add_argument("--work-dir", help="models and logs (default: a new temporary directory)")
    parser.add_argument("--json", help="write every run's raw result here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare(args: argparse.Namespace) -> tuple[Path, str, str, Path]:
    """Work dir with the built pair; returns (work, teacher dir, student dir, log path)."""
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mgsr-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "runs.log"
    teacher, student = work / f"teacher-{args.teacher_size}", work / f"student-{args.student_size}"
    if not (teacher / "config.json").exists() or not (student / "config.json").exists():
        build = Spec("build", 0.0, args.teacher_size, args.student_size, str(work))
        run_child(SCRIPT, "--build", dataclasses.asdict(build), "build", log_path, emits_result=False)
    return work, str(teacher), str(student), log_path


def main() -> None:
    args = parse_args()
    if args.child or args.build:
        spec = Spec(**json.loads(args.child or args.build))
        (child_main if args.child else build_main)(spec)
        return
    work, teacher, student, log_path = prepare(args)
    betas = [float(beta) for beta in args.betas.split(",")]
    variants = args.variants.split(",")
    common = dict(
        teacher=teacher, student=student, work_dir=str(work), limit=args.limit, max_length=args.max_length,
        batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, chunk_size=args.chunk_size, threads=args.threads,
    )
    if args.recipes:
        print(recipe_report(args, run_recipes(args, common, log_path)))
        return
    results: dict[tuple[float, str], list[dict]] = {(beta, variant): [] for beta in betas for variant in variants}
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | torch threads {args.threads} | "
          f"load average {os.getloadavg()[0]:.2f} | {available_gib():.1f} GiB available | logs: {log_path}", file=sys.stderr)
    for run in range(args.runs):
        for beta in betas:
            for variant in variants:
                result = run_spec(Spec(variant=variant, beta=beta, **common), log_path)
                results[(beta, variant)].append(result)
                print(f"run {run + 1}/{args.runs} beta {beta:g} {variant:5s}: {result['response_tok_s']:8,.0f} resp tok/s, "
                      f"{result['s_per_step']:.2f} s/step, peak {result['maxrss_mib']:6,.0f} MiB, step-1 loss {result['first_loss']:.6f} "
                      f"(load avg {os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({f"{beta:g}/{variant}": runs for (beta, variant), runs in results.items()}, indent=1))
    print(report(args, results, betas, variants))


def run_recipes(args: argparse.Namespace, common: dict, log_path: Path) -> dict[str, list[dict]]:
    """Every recipe's runs, interleaved A B C A B C, each in a fresh process."""
    recipes = args.recipes.split(",")
    results: dict[str, list[dict]] = {recipe: [] for recipe in recipes}
    started = time.time()
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | torch threads {args.threads} | "
          f"load average {os.getloadavg()[0]:.2f} | logs: {log_path}", file=sys.stderr)
    for run in range(args.runs):
        for recipe in recipes:
            variant, own = (recipe, None) if recipe in OTHER_LOOPS else ("mgsr", recipe)
            result = run_spec(Spec(variant=variant, beta=0.0, recipe=own, **common), log_path)
            results[recipe].append(result)
            print(f"run {run + 1}/{args.runs} {recipe:12s}: {result['response_tok_s']:8,.0f} resp tok/s, "
                  f"{result['s_per_step']:.2f} s/step, peak {result['maxrss_mib']:6,.0f} MiB "
                  f"(load avg {os.getloadavg()[0]:.2f}, {time.time() - started:.0f} s)", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


def recipe_report(args: argparse.Namespace, results: dict[str, list[dict]]) -> str:
    """Medians per recipe and their ratios to the floor (and of mgsr to kd), all from this invocation."""
    first = next(iter(results.values()))[0]
    floor = results.get(FLOOR)
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size}, V = 50257, fp32, batch {args.batch_size}, max length "
        f"{args.max_length}, Dolly train (first {args.limit}), {args.steps} steps (timed: the last {args.steps - args.warmup}), "
        f"chunk {args.chunk_size}, sgo_policy none, {args.threads} torch threads, medians of {args.runs} interleaved runs; "
        f"torch {first['torch']}; load average over the timed steps {statistics.median(r['load_average'] for runs in results.values() for r in runs):.1f}",
        "",
        "| recipe | loss | response tok/s | s/step | peak RSS MiB | step time / floor | peak / floor |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for recipe, runs in results.items():
        loss = recipe_loss(recipe)
        speed, peak = median(runs, "response_tok_s"), median(runs, "maxrss_mib")
        ratios = (
            f"{median(floor, 'response_tok_s') / speed:.2f}x | {peak / median(floor, 'maxrss_mib'):.2f}x" if floor else "- | -"
        )
        lines.append(f"| {recipe} | `{loss}` | {speed:,.0f} | {median(runs, 's_per_step'):.2f} | {peak:,.0f} | {ratios} |")
    lines.append("")
    for a, b in (("mgsr", "kd"), ("kd", FLOOR), ("mgsr", "trl"), ("mgsr", "naive"), ("kd", "trl")):
        if a in results and b in results:
            ra, rb = results[a], results[b]
            lines.append(
                f"- {a} / {b}: step time {median(rb, 'response_tok_s') / median(ra, 'response_tok_s'):.2f}x "
                f"(tokens/s {median(ra, 'response_tok_s') / median(rb, 'response_tok_s'):.2f}x), "
                f"peak RSS {median(ra, 'maxrss_mib') / median(rb, 'maxrss_mib'):.2f}x"
            )
    lines += ["", "Every run (response tok/s / peak RSS MiB), in run order:", ""]
    lines += [f"- {recipe}: " + ", ".join(f"{r['response_tok_s']:,.0f} / {r['maxrss_mib']:,.0f}" for r in runs) for recipe, runs in results.items()]
    return "\n".join(lines)


def report(args: argparse.Namespace, results: dict, betas: list[float], variants: list[str]) -> str:
    """The markdown tables: medians per (beta, variant), then the ratios and the loss check."""
    first = next(iter(results.values()))[0]
    trl_versions = {run["trl_version"] for (_, variant), runs in results.items() if variant == "trl" for run in runs}
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size} (layers x width x heads), V = 50257, fp32, "
        f"batch {args.batch_size}, max length {args.max_length}, Dolly train (first {args.limit}), {args.steps} steps "
        f"(timed: the last {args.steps - args.warmup}), mgsr chunk {args.chunk_size}, {args.threads} torch threads, "
        f"medians of {args.runs} interleaved runs; torch {first['torch']}" + "".join(f", TRL {version}" for version in sorted(trl_versions)),
        "",
        "| beta | variant | response tok/s | total tok/s | s/step | CPU s/step | peak RSS MiB | RSS before step 1 MiB | peak in steps MiB | load avg |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for beta in betas:
        for variant in variants:
            runs = results[(beta, variant)]
            lines.append(
                f"| {beta:g} | {variant} | {median(runs, 'response_tok_s'):,.0f} | {median(runs, 'total_tok_s'):,.0f} | "
                f"{median(runs, 's_per_step'):.2f} | {median(runs, 'cpu_s_per_step'):.2f} | {median(runs, 'maxrss_mib'):,.0f} | "
                f"{median(runs, 'ready_rss_mib'):,.0f} | {median(runs, 'train_peak_mib'):,.0f} | {median(runs, 'load_average'):.1f} |"
            )
    lines += [
        "",
        "Ratios of the medians. tok/s: response tokens per second (wall clock); CPU: the same from CPU time; "
        "peak: peak RSS of the process, in brackets the growth during the steps over the RSS before step 1.",
        "",
    ]
    pairs = [(a, b) for a, b in (("mgsr", "trl"), ("mgsr", "naive"), ("naive", "trl")) if a in variants and b in variants]
    lines.append("| beta | " + " | ".join(f"{a}/{b} tok/s | CPU | {a}/{b} peak" for a, b in pairs) + " |")
    lines.append("|---:|" + "---:|---:|---:|" * len(pairs))
    for beta in betas:
        cells = []
        for a, b in pairs:
            ra, rb = results[(beta, a)], results[(beta, b)]
            speed = median(ra, "response_tok_s") / median(rb, "response_tok_s")
            cpu = median(rb, "cpu_s_per_step") / median(ra, "cpu_s_per_step")
            peak = median(ra, "maxrss_mib") / median(rb, "maxrss_mib")
            growth = (median(ra, "train_peak_mib") - median(ra, "ready_rss_mib")) / max(
                median(rb, "train_peak_mib") - median(rb, "ready_rss_mib"), 1e-9
            )
            cells.append(f"{speed:.2f}x | {cpu:.2f}x | {peak:.2f}x ({growth:.2f}x)")
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    lines += ["", "Step-1 loss (before any update) and data check (token-id fingerprint of all batches):", ""]
    for beta in betas:
        losses = {variant: results[(beta, variant)][0]["first_loss"] for variant in variants}
        prints = {run["fingerprint"] for variant in variants for run in results[(beta, variant)]}
        spread = max(losses.values()) - min(losses.values())
        lines.append(
            f"- beta {beta:g}: " + ", ".join(f"{variant} {loss:.7f}" for variant, loss in losses.items())
            + f"; max difference {spread:.1e} ({spread / max(abs(min(losses.values())), 1e-12):.1e} relative); "
            + ("identical batches in every run" if len(prints) == 1 else f"DIFFERENT batches: {sorted(prints)}")
        )
    lines += ["", "Every run (response tok/s / peak RSS MiB), in run order:", ""]
    for (beta, variant), runs in results.items():
        lines.append(f"- beta {beta:g} {variant}: " + ", ".join(f"{run['response_tok_s']:,.0f} / {run['maxrss_mib']:,.0f}" for run in runs))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
