"""The lab's own small tokenizer and GPT-2 pair, saved so that `mgsr` loads them like any model.

The real GPT-2 vocabulary (50,257 rows) would dominate the cost of models this small on a CPU,
so the lab trains a byte-level BPE on the Dolly training responses and prompts instead: every
byte stays representable (no unknown token), and one special token serves as EOS, BOS and pad.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from mgsr_cli.config import DataConfig
from mgsr_cli.data import load_examples
from mgsr_cli.models import TinySize

END_OF_TEXT = "<|endoftext|>"


def dolly_train_texts(limit: int | None) -> Iterator[str]:
    """Prompt and first reference of each Dolly training example, through mgsr's loader."""
    for example in load_examples("dolly_train", DataConfig(), limit):
        yield example.prompt
        yield from example.references[:1]


def train_tokenizer(out_dir: Path, vocab_size: int, limit: int | None = None) -> Path:
    """A byte-level BPE trained on Dolly train, written in Hugging Face layout (tokenizer.json + config)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[END_OF_TEXT],  # id 0
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(dolly_train_texts(limit), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text, which span offsets rely on
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(str(out_dir))
    return out_dir


def build_model(out_dir: Path, tokenizer_dir: Path, size: TinySize, seed: int, n_positions: int) -> Path:
    """A randomly initialised GPT-2 of `size` over the lab tokenizer, with the tokenizer beside it."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    GPT2LMHeadModel(config).save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def tokens_per_word(tokenizer_dir: Path, texts: list[str]) -> float:
    """Tokens per whitespace word on `texts`: how compact the lab vocabulary is."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return tokens / max(sum(len(text.split()) for text in texts), 1)


def describe(model_dir: Path) -> dict:
    """Shape and size of a saved model, for the report (tied embeddings counted once)."""
    from transformers import AutoModelForCausalLM

    config = json.loads((model_dir / "config.json").read_text())
    parameters = sum(parameter.numel() for parameter in AutoModelForCausalLM.from_pretrained(str(model_dir)).parameters())
    return {
        "n_layer": config["n_layer"],
        "n_embd": config["n_embd"],
        "n_head": config["n_head"],
        "vocab_size": config["vocab_size"],
        "n_positions": config["n_positions"],
        "parameters": parameters,
    }
