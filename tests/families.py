"""Tiny random-weight pairs of common architectures, all with the GPT-2 tokenizer.

Hidden size 16, 2 layers: the model is mostly its 50,257-row embedding (~3 MB), the smallest a
real GPT-2 vocabulary allows. Windows are 8 tokens where the family has one, shorter than every
test sequence, so the sliding-window code paths are the ones exercised.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mgsr_cli.models import write_gpt2_tokenizer

VOCAB = 50257
EOS = 50256
WINDOW = 8
_COMMON = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "max_position_embeddings": 256, "bos_token_id": EOS, "eos_token_id": EOS}


def _config(family: str, vocab_size: int):
    import transformers as t

    if family == "llama":
        return t.LlamaConfig(vocab_size=vocab_size, num_key_value_heads=1, **_COMMON)
    if family == "qwen2":  # tied embeddings; the teacher's head is padded (see build_pair)
        return t.Qwen2Config(vocab_size=vocab_size, num_key_value_heads=1, tie_word_embeddings=True, **_COMMON)
    if family == "mistral":
        return t.MistralConfig(vocab_size=vocab_size, num_key_value_heads=1, sliding_window=WINDOW, **_COMMON)
    if family == "gemma2":  # hybrid: sliding and full layers alternate; logit soft-capping
        return t.Gemma2Config(vocab_size=vocab_size, num_key_value_heads=1, head_dim=8, sliding_window=WINDOW,
                              layer_types=["sliding_attention", "full_attention"], **_COMMON)
    if family == "phi3":
        return t.Phi3Config(vocab_size=vocab_size, sliding_window=WINDOW, pad_token_id=EOS, **_COMMON)
    if family == "opt":
        return t.OPTConfig(vocab_size=vocab_size, hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                           word_embed_proj_dim=16, max_position_embeddings=256, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)
    if family == "gpt_neox":
        return t.GPTNeoXConfig(vocab_size=vocab_size, **_COMMON)
    if family == "mixtral":  # mixture of experts
        return t.MixtralConfig(vocab_size=vocab_size, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, **_COMMON)
    raise ValueError(family)


FAMILIES = ("llama", "qwen2", "mistral", "gemma2", "phi3", "opt", "gpt_neox", "mixtral")


def build_model(family: str, out_dir: Path, seed: int, vocab_size: int = VOCAB) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, vocab_size))
    model.generation_config.eos_token_id = EOS
    write_gpt2_tokenizer(out_dir)  # first: its config.json stub is then replaced by the model's
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def build_pair(family: str, out_dir: Path) -> tuple[Path, Path]:
    """(teacher, student); Qwen2's teacher has its output rows padded to 50,304 as real checkpoints do."""
    teacher_vocab = 50304 if family == "qwen2" else VOCAB
    return build_model(family, out_dir / "teacher", 0, teacher_vocab), build_model(family, out_dir / "student", 1)
