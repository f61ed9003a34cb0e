"""bench_distill's three training loops (child side): mgsr's own, TRL's GKDTrainer, a plain full-logit loop.

Each trains the `Spec` it is given and marks its steps on the `Meter`; all three see the same
batches in the same order (harness.training_batches), so their step-1 losses must agree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from harness import Meter, Spec, batches_fingerprint, import_gkd, load_student_teacher, token_counts, training_batches

FLOOR = "floor"  # --recipes pseudo-recipe: sft as the only loss, with the teacher still run
OTHER_LOOPS = ("trl", "naive")  # --recipes pseudo-recipes: those loops' forward KL step (beta 0)



def loss_spec(beta: float) -> str:
    """mgsr's loss for GKD's beta: beta 0 is forward KL (the kd recipe's fkl)."""
    return "fkl" if beta == 0 else f"gjsd:{beta:g}"


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



RUNNERS = {"mgsr": run_mgsr, "trl": run_trl, "naive": run_naive}
