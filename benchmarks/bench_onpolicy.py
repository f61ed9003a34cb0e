"""On-policy training throughput and peak memory: mgsr's in-loop generation vs TRL's GKDTrainer.

Every variant trains the same student against the same teacher (bench_distill's tiny GPT-2 pair,
real 50,257-token vocabulary, fp32 on the CPU, dropout off) from the same ground-truth batches
(mgsr's own draw order), with the same generation config (pure sampling: temperature 1, top-k
off, top-p 1, exactly `--new-tokens` new tokens per prompt; prompts at most `--max-prompt`
tokens), AdamW, clipping 1.0 and number of steps:
- mgsr-gkd:     `--recipe gkd` (gjsd:0.5, sgo_policy mixed:0.5: a step generates with p 0.5);
- mgsr-gkd-l1:  the same with sgo_policy on_policy (every step generates);
- mgsr-mgsr:    `--recipe mgsr` with sgo_policy on_policy: every step samples, SCRG revises, and
                sft (ground truth) + dac_kl + span (revised outputs) train;
- trl-l0.5 / trl-l1: `GKDTrainer`, beta 0.5, lmbda 0.5 / 1.0, seq_kd off (its HF `generate` path).

The timed window and memory marks are harness.py's (`Meter`), the process isolation child_runs' (one fresh
process per run, interleaved). "tokens" are the response tokens the distillation loss is scored
on (generated ones on generating steps); the share of generating steps is reported because the
lmbda 0.5 coin is drawn by each library's own RNG.

    PYTHONPATH=. nice python benchmarks/bench_onpolicy.py --runs 2

Needs the bench extra: pip install -e '.[bench]' (TRL).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_distill import prepare  # noqa: E402
from harness import Meter, available_gib, import_gkd, load_student_teacher, machine_description, median  # noqa: E402  (the shared harness of the training benchmarks)
from child_runs import emit_result, run_child  # noqa: E402

VARIANTS = ("mgsr-gkd", "mgsr-gkd-l1", "mgsr-mgsr", "trl-l0.5", "trl-l1")
RATIOS = (("mgsr-gkd", "trl-l0.5"), ("mgsr-gkd-l1", "trl-l1"), ("mgsr-mgsr", "trl-l1"))


@dataclass
class Spec:
    variant: str
    teacher: str
    student: str
    work_dir: str
    limit: int = 400
    max_prompt: int = 128
    new_tokens: int = 64
    batch_size: int = 8
    steps: int = 6
    warmup: int = 2
    seed: int = 42
    threads: int = 2

    @property
    def max_length(self) -> int:
        return self.max_prompt + self.new_tokens


def mgsr_config(spec: Spec):
    from mgsr_cli.config import DistillConfig
    from mgsr_cli.config_loading import load_recipe, override, recipe_path

    recipe = "mgsr" if spec.variant == "mgsr-mgsr" else "gkd"
    changes = {
        "teacher": spec.teacher, "student": spec.student, "data": "dolly_train", "limit": spec.limit, "dev_data": None,
        "data_format": {"max_prompt_length": spec.max_prompt}, "max_length": spec.max_length,
        "sgo_sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": spec.new_tokens},
        "batch_size": spec.batch_size, "max_steps": spec.steps, "lr": 5e-4, "eval_every": 0, "save_every": 0,
        "log_every": spec.steps, "seed": spec.seed, "device": "cpu", "dtype": "float32", "teacher_dtype": "float32",
    }
    if spec.variant != "mgsr-gkd":
        changes["sgo_policy"] = "on_policy"
    return override(load_recipe(DistillConfig, recipe_path(recipe)), changes)


def ground_truth_batches(config, tokenizer) -> list[list]:
    """The global batches mgsr's loop draws for `config` (its data path, prompt limit and order)."""
    from mgsr_cli.batches import ground_truth_sequences
    from mgsr_cli.data import load_examples
    from mgsr_cli.train_data import global_batch

    examples = load_examples(config.data, config.data_format, config.limit)
    sequences = ground_truth_sequences(examples, tokenizer, config.data_format.max_prompt_length, config.max_length, None)
    return [global_batch(sequences, config.batch_size, config.seed, step) for step in range(config.max_steps)]


def run_mgsr(spec: Spec, meter: Meter) -> dict:
    """mgsr's distill loop; the scored distillation rows are read from the planned parts."""
    from mgsr_cli.train import Distillation

    distillation = Distillation(mgsr_config(spec), Path(spec.work_dir) / f"mgsr-out-{os.getpid()}", resume=False, overwrite=True)
    untimed_step, untimed_plan = distillation.train_step, distillation.batches.plan_parts
    scored, generated = [], []

    def plan_parts(ground_truth, distill):
        parts = untimed_plan(ground_truth, distill)
        scored.append(sum(micro[-1].batch.num_rows for micro in parts))  # the distillation part is the last
        return parts

    def timed_step(step: int) -> dict:
        if step == 0:
            meter.begin()
        metrics = untimed_step(step)
        generated.append(metrics["source"] == "fresh")
        if step == 0:
            meter.first_loss = metrics["loss"]
        meter.step_done(scored[-1], scored[-1])
        return metrics

    distillation.batches.plan_parts, distillation.train_step = plan_parts, timed_step
    distillation.train()
    return {"generating_steps": generated[spec.warmup :]}


def run_trl(spec: Spec, meter: Meter) -> dict:
    """GKDTrainer with lmbda 0.5 or 1, prompts left-padded for its `generate` call."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from mgsr_cli.models import load_tokenizer

    GKDConfig, GKDTrainer = import_gkd()
    tokenizer = load_tokenizer(spec.student)
    batches = ground_truth_batches(mgsr_config(spec), tokenizer)
    dataset = Dataset.from_list(
        [{"prompt": s.prompt_ids, "response": s.response_ids} for batch in batches for s in batch]
    )
    pad_id = tokenizer.pad_token_id

    def collate(features: list[dict]) -> dict:
        width = max(len(f["prompt"]) + len(f["response"]) for f in features)
        prompt_width = max(len(f["prompt"]) for f in features)
        out = {
            "input_ids": torch.full((len(features), width), pad_id), "labels": torch.full((len(features), width), -100),
            "attention_mask": torch.zeros((len(features), width), dtype=torch.long),
            "prompts": torch.full((len(features), prompt_width), pad_id),
            "prompt_attention_mask": torch.zeros((len(features), prompt_width), dtype=torch.long),
        }
        for row, f in enumerate(features):
            ids, n, p = f["prompt"] + f["response"], len(f["prompt"]) + len(f["response"]), len(f["prompt"])
            out["input_ids"][row, :n] = torch.tensor(ids)
            out["labels"][row, p:n] = torch.tensor(f["response"])
            out["attention_mask"][row, :n] = 1
            out["prompts"][row, prompt_width - p :] = torch.tensor(f["prompt"])  # left padding for generate
            out["prompt_attention_mask"][row, prompt_width - p :] = 1
        return out

    scored, generated = [], []

    class MeterCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            meter.begin()

        def on_step_end(self, args, state, control, **kwargs):
            meter.step_done(scored[-1], scored[-1])

    student, teacher = load_student_teacher(spec)
    lmbda = 0.5 if spec.variant == "trl-l0.5" else 1.0
    args = GKDConfig(
        output_dir=str(Path(spec.work_dir) / f"trl-out-{os.getpid()}"), lmbda=lmbda, beta=0.5, seq_kd=False,
        temperature=1.0, max_new_tokens=spec.new_tokens, disable_dropout=True,
        per_device_train_batch_size=spec.batch_size, gradient_accumulation_steps=1, max_steps=spec.steps,
        max_length=spec.max_length, learning_rate=5e-4, weight_decay=0.01, lr_scheduler_type="cosine", warmup_steps=0,
        max_grad_norm=1.0, optim="adamw_torch", bf16=False, fp16=False, use_cpu=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0, remove_unused_columns=False,
        logging_steps=spec.steps, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        seed=spec.seed,
    )
    trainer = GKDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset, processing_class=tokenizer,
                         data_collator=collate, callbacks=[MeterCallback()])
    untimed_generate, untimed_loss = trainer.generate_on_policy_outputs, trainer.compute_loss

    def generate(*arguments, **kwargs):
        generated[-1] = True
        return untimed_generate(*arguments, **kwargs)

    def compute_loss(model, inputs, *rest, **kwargs):
        scored.append(int((inputs["labels"] != -100).sum()))
        loss = untimed_loss(model, inputs, *rest, **kwargs)
        if meter.first_loss is None:
            meter.first_loss = float(loss[0] if isinstance(loss, tuple) else loss)
        return loss

    untimed_training_step = trainer.training_step

    def training_step(*arguments, **kwargs):
        generated.append(False)
        return untimed_training_step(*arguments, **kwargs)

    trainer.generate_on_policy_outputs, trainer.compute_loss, trainer.training_step = generate, compute_loss, training_step
    trainer.train()
    return {"generating_steps": generated[spec.warmup :], "trl_version": trl.__version__}


def child_main(spec: Spec) -> None:
    import torch

    torch.set_num_threads(spec.threads)
    meter = Meter(spec.steps, spec.warmup)
    extra = (run_trl if spec.variant.startswith("trl") else run_mgsr)(spec, meter)
    emit_result({**meter.result(), **extra, "torch": torch.__version__})


def report(args, results: dict[str, list[dict]]) -> str:
    first = next(iter(results.values()))[0]
    versions = sorted({run["trl_version"] for runs in results.values() for run in runs if "trl_version" in run})
    lines = [
        f"teacher {args.teacher_size}, student {args.student_size}, V = 50257, fp32, batch {args.batch_size}, prompts <= "
        f"{args.max_prompt} tokens, {args.new_tokens} sampled new tokens (T 1, top-k off, top-p 1), {args.steps} steps "
        f"(timed: the last {args.steps - args.warmup}), {args.threads} torch threads, medians of {args.runs} interleaved runs; "
        f"torch {first['torch']}" + "".join(f", TRL {v}" for v in versions),
        "",
        "| variant | scored tok/s | s/step | generating steps (timed) | peak RSS MiB | peak in steps MiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for variant, runs in results.items():
        share = sum(sum(run["generating_steps"]) for run in runs) / sum(len(run["generating_steps"]) for run in runs)
        lines.append(
            f"| {variant} | {median(runs, 'response_tok_s'):,.0f} | {median(runs, 's_per_step'):.2f} | {share:.0%} | "
            f"{median(runs, 'maxrss_mib'):,.0f} | {median(runs, 'train_peak_mib'):,.0f} |"
        )
    lines += ["", "| mgsr / TRL | tok/s | s/step (TRL / mgsr) | peak RSS |", "|---|---:|---:|---:|"]
    for a, b in RATIOS:
        if a in results and b in results:
            ra, rb = results[a], results[b]
            lines.append(
                f"| {a} / {b} | {median(ra, 'response_tok_s') / median(rb, 'response_tok_s'):.2f}x | "
                f"{median(rb, 's_per_step') / median(ra, 's_per_step'):.2f}x | {median(ra, 'maxrss_mib') / median(rb, 'maxrss_mib'):.2f}x |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--teacher-size", default="4x128x4")
    parser.add_argument("--student-size", default="2x64x2")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--work-dir")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(Spec(**json.loads(args.child)))
        return
    work, teacher, student, log_path = prepare(args)
    common = dict(teacher=teacher, student=student, work_dir=str(work), limit=args.limit, max_prompt=args.max_prompt,
                  new_tokens=args.new_tokens, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, threads=args.threads)
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} | {machine_description()} | load average {os.getloadavg()[0]:.2f} | "
          f"{available_gib():.1f} GiB available | logs: {log_path}", file=sys.stderr)
    results: dict[str, list[dict]] = {variant: [] for variant in args.variants.split(",")}
    for run in range(args.runs):
        for variant in results:
            spec = Spec(variant=variant, **common)
            result = run_child(__file__, "--child", dataclasses.asdict(spec), variant, log_path)
            results[variant].append(result)
            print(f"run {run + 1} {variant}: {result['response_tok_s']:,.0f} tok/s, {result['s_per_step']:.2f} s/step, "
                  f"peak {result['maxrss_mib']:,.0f} MiB", file=sys.stderr, flush=True)
    print(report(args, results))


if __name__ == "__main__":
    main()
