"""Validation during `distill`: the dev loss drives the adaptive scheduler's θ; dev ROUGE-L of
sampled responses (with `eval_rouge`) picks the best step. Both are global over all processes."""

from __future__ import annotations

import torch
from torch import nn

from mgsr_cli.config import DistillConfig
from mgsr_cli.data import tokenize_prompts
from mgsr_cli.metrics import rouge_l_max
from mgsr_cli.sampling import TokenSpace, batch_seed, make_generator, sample
from mgsr_cli.train_data import StepBatches, TrainingData


@torch.no_grad()
def validation_loss(module: nn.Module, batches: StepBatches, teacher: nn.Module | None, accelerator) -> float:
    """The whole objective on the dev ground truth, as one token-weighted mean (NaN without dev data)."""
    if not batches.data.dev_sequences:
        return float("nan")
    dev, tokens, pairs = batches.dev_batches()
    module.eval()
    total = torch.zeros((), device=accelerator.device)
    for batch in dev:
        with accelerator.autocast():
            loss, _ = module([batches.part(batch, tokens, pairs)], teacher)
        total += loss.float()
    module.train()
    return float(accelerator.reduce(total, reduction="sum"))


@torch.no_grad()
def validation_rouge(student: nn.Module, data: TrainingData, tokenizer, token_space: TokenSpace, config: DistillConfig, accelerator) -> float:
    """Dev ROUGE-L x100 of sampled responses (fixed seeds, so steps are compared fairly)."""
    world = accelerator.num_processes
    prompts = tokenize_prompts(data.dev_examples[: config.eval_rouge_examples], tokenizer, config.data_format.max_prompt_length, data.rendering)
    mine = prompts[accelerator.process_index :: world]
    size = max(config.batch_size // world, 1)
    student.eval()
    scores = []
    for start in range(0, len(mine), size):
        batch = mine[start : start + size]
        generator = make_generator(batch_seed(config.seed, start), accelerator.device)
        output = sample(student, [list(p.prompt_ids) for p in batch], config.eval_sampling, generator, token_space)
        for row, prompt in enumerate(batch):
            text = tokenizer.decode(output.row(row), skip_special_tokens=True)
            scores.append(rouge_l_max(text, prompt.example.references))
    student.train()
    totals = accelerator.reduce(torch.tensor([sum(scores), len(scores)], device=accelerator.device, dtype=torch.float64), reduction="sum")
    return 100.0 * float(totals[0]) / max(float(totals[1]), 1.0)
