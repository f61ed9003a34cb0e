"""Final hidden states and the output layer, separately: score only the positions a loss needs.

`model(input_ids).logits` is [B, T, V]: at V = 50k-150k that tensor, not the network, dominates
memory. Stages that need distributions at a subset of positions (SCRG's response positions,
the distillation losses) take the backbone's hidden states, gather the rows they need and
project them through the output layer in chunks, cut to the tokenizer's real vocabulary
(padded output rows beyond it are never scored).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def backbone(model) -> nn.Module:
    """The transformer without its output layer (`model.transformer` for GPT-2, `model.model` for LLaMA)."""
    return getattr(model, model.base_model_prefix)


@functools.cache
def _forward_parameters(module_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(module_class.forward).parameters)


def accepts(module: nn.Module, argument: str) -> bool:
    """Whether the module's forward takes `argument`, read once per class: decoding asks every step."""
    return argument in _forward_parameters(type(module))


def cache_argument(module: nn.Module, cache) -> dict:
    """The KV cache under the keyword this transformers version's forward takes: `cache` since the
    5.x rename, `past_key_values` before (passing the old name now warns and goes away in 5.40)."""
    return {"cache" if accepts(module, "cache") else "past_key_values": cache}


def returned_cache(output):
    """The cache a forward returned, read under the same version-dependent name."""
    return output["cache"] if "cache" in output else output.past_key_values


def hidden_states(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, cache=None, use_cache: bool = False):
    """[B, L, H] final hidden states (after the final norm) and the KV cache when asked for."""
    transformer = backbone(model)
    output = transformer(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=use_cache,
        **cache_argument(transformer, cache),
    )
    return output.last_hidden_state, (returned_cache(output) if use_cache else None)


def project(model, hidden: Tensor, vocab_size: int) -> Tensor:
    """Logits [..., vocab_size] for hidden rows [..., H]: the output layer cut to the real vocabulary,
    with the model's logit scaling / soft-capping applied as its own forward would."""
    head = model.get_output_embeddings()
    return _apply_head(model, hidden, head.weight, getattr(head, "bias", None), vocab_size)


def _post_process(model, logits: Tensor) -> Tensor:
    """Logit scaling and final soft-capping, for the architectures whose forward applies them."""
    config = model.config
    scale = getattr(config, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def check_head_matches_forward(model, vocab_size: int) -> None:
    """Fail loudly if `project(hidden_states)` differs from the model's own logits on a probe input:
    an architecture with an unusual head must not be silently mis-scored."""
    device = next(model.parameters()).device
    probe = torch.arange(1, 9, device=device).clamp(max=vocab_size - 1)[None]
    mask = torch.ones_like(probe)
    reference = model(input_ids=probe, attention_mask=mask).logits[..., :vocab_size].float()
    hidden, _ = hidden_states(model, probe, mask)
    ours = project(model, hidden, vocab_size).float()
    tolerance = 1e-3 if reference.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 5e-2
    if not torch.allclose(ours, reference, atol=tolerance, rtol=tolerance):
        raise RuntimeError(
            f"{type(model).__name__}: projecting hidden states does not reproduce the model's logits "
            f"(max difference {(ours - reference).abs().max().item():.3g}); this architecture's output head is not supported"
        )


@dataclass
class HeadScore:
    """What the fused head reports besides the loss: detached per-row values and term/stat means."""

    per_token: Tensor
    terms: dict[str, Tensor]
    stats: dict[str, Tensor]


@dataclass
class HeadLossInputs:
    """Everything `fused_head_loss` needs that is not a differentiable tensor.

    teacher_hidden: [N, H'] teacher rows (no grad) or None when no term needs the teacher;
    targets [N]; pairs [P, 2] row indices; counts are the global token / pair counts that
    the term means divide by (over all chunks, micro-batches and ranks).
    """

    student: nn.Module
    teacher: nn.Module | None
    objective: nn.Module
    teacher_hidden: Tensor | None
    targets: Tensor | None
    pairs: Tensor | None
    vocab_size: int
    chunk_size: int
    token_count: int
    pair_count: int
    score: HeadScore | None = None
    compute_gradients: bool = True


def fused_head_loss(inputs: HeadLossInputs, student_hidden: Tensor) -> Tensor:
    """The objective on [N, H] student rows, projecting `chunk_size` rows at a time.

    Equals `objective(project(student, hidden), project(teacher, teacher_hidden), ...)` in
    value and gradient, but never holds more than one chunk of [rows, V] logits: each chunk's
    gradient (to the hidden rows, the output layer and the objective's own parameters, e.g.
    DAC-KL's f_sub) is computed right away and kept, so backward is a multiply and the logits
    are never recomputed. Per-row values and term means land in `inputs.score`.
    """
    head = inputs.student.get_output_embeddings()
    bias = getattr(head, "bias", None)
    parameters = [parameter for parameter in inputs.objective.parameters() if parameter.requires_grad]
    inputs.compute_gradients = torch.is_grad_enabled()  # validation: score only, no eager gradients
    return _FusedHeadLoss.apply(inputs, student_hidden, head.weight, bias, *parameters)


class _FusedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: HeadLossInputs, hidden: Tensor, weight: Tensor, bias: Tensor | None, *parameters: Tensor):
        differentiable = [hidden, weight, bias, *parameters]
        wants = [inputs.compute_gradients and tensor is not None and tensor.requires_grad for tensor in differentiable]
        gradients = [torch.zeros_like(tensor) if want else None for tensor, want in zip(differentiable, wants)]
        from mgsr_cli.losses import Rows, pairs_within, plan_chunks

        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        per_token, terms, stats = [], {}, {}
        with torch.enable_grad() if inputs.compute_gradients else torch.no_grad():
            leaf_weight = weight.detach().requires_grad_(wants[1])
            leaf_bias = bias.detach().requires_grad_(wants[2]) if bias is not None else None
            for start, end in plan_chunks(hidden.shape[0], inputs.chunk_size, inputs.pairs):
                rows_hidden = hidden[start:end].detach().requires_grad_(wants[0])
                student_logits = _apply_head(inputs.student, rows_hidden, leaf_weight, leaf_bias, inputs.vocab_size)
                with torch.no_grad():
                    teacher_logits = (
                        project(inputs.teacher, inputs.teacher_hidden[start:end], inputs.vocab_size)
                        if inputs.teacher_hidden is not None
                        else student_logits.detach()  # no term reads it: a free stand-in of the right shape
                    )
                rows = Rows(
                    student_logits,
                    teacher_logits,
                    inputs.targets[start:end] if inputs.targets is not None else None,
                    pairs_within(inputs.pairs, start, end),
                )
                score = inputs.objective.score_rows(rows, inputs.token_count, inputs.pair_count)
                leaves = [rows_hidden, leaf_weight, leaf_bias, *parameters]
                needed = [leaf for leaf, want in zip(leaves, wants) if want]
                if needed and score.loss.requires_grad:
                    for index, grad in zip((i for i, want in enumerate(wants) if want), torch.autograd.grad(score.loss, needed, allow_unused=True)):
                        if grad is None:
                            continue
                        if index == 0:
                            gradients[0][start:end] += grad
                        else:
                            gradients[index] += grad
                total += score.loss.detach().to(total.dtype)
                per_token.append(score.per_token)
                for name, value in score.terms.items():
                    terms[name] = terms.get(name, 0) + value
                for name, value in score.stats.items():
                    stats[name] = stats.get(name, 0) + value
                # Drop this chunk's [rows, V] logits now: otherwise they stay referenced while the
                # next chunk's are built, and two chunks of logits are alive at once.
                del student_logits, teacher_logits, rows, score
        inputs.score = HeadScore(torch.cat(per_token) if per_token else hidden.new_zeros(0), terms, stats)
        ctx.save_for_backward(*[grad if grad is not None else torch.empty(0) for grad in gradients])
        ctx.has_gradient = [grad is not None for grad in gradients]
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        saved = ctx.saved_tensors
        grads = [tensor * grad_output.to(tensor.dtype) if has else None for tensor, has in zip(saved, ctx.has_gradient)]
        return (None, *grads)


def _apply_head(model, hidden: Tensor, weight: Tensor, bias: Tensor | None, vocab_size: int) -> Tensor:
    logits = F.linear(hidden, weight[:vocab_size], bias[:vocab_size] if bias is not None else None)
    return _post_process(model, logits)

