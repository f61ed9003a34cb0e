"""Loading causal LMs and tokenizers (hub id or local directory), and the embedded tiny GPT-2 pair."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from mgsr_cli.config import ModelLoading
from mgsr_cli.errors import UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device '{name}': {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device '{name}' asked for, but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a CUDA device that supports it, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UsageError(f"unknown dtype '{name}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def _looks_local(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else is meant as a path on disk."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _check_exists(name: str, what: str) -> None:
    if not Path(name).expanduser().exists() and _looks_local(name):
        raise UsageError(f"{what} '{name}' not found: no such directory")


def _resolve(name: str) -> str:
    """A local directory (a `distill` output stands for its trained student) or a hub id."""
    path = Path(name).expanduser()
    if not path.exists():
        return name
    manifest = path / "manifest.json"
    if manifest.exists() and '"stage": "distill"' in manifest.read_text(encoding="utf-8"):
        return str(path / "student")
    return str(path)


def load_tokenizer(name: str, trust_remote_code: bool = False, padding_side: str = "left"):
    """A tokenizer with a pad token (EOS for GPT-2-style vocabularies that have none)."""
    from transformers import AutoTokenizer

    _check_exists(name, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(_resolve(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load tokenizer '{name}': {_first_line(error)}") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"tokenizer '{name}' has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def load_model(name: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False):
    """A causal LM in eval mode on `device`; safetensors weights are preferred when both exist."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_exists(name, "model")
    try:
        model = AutoModelForCausalLM.from_pretrained(_resolve(name), trust_remote_code=trust_remote_code, **_dtype_kwarg(dtype))
    except (OSError, ValueError, KeyError, RuntimeError, EOFError, SafetensorError) as error:  # damaged weights too
        raise UsageError(f"cannot load model '{name}': {_first_line(error)}") from None
    return model.to(device).eval()


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers renamed `torch_dtype` to `dtype` in 4.56; pass whichever this version takes."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _first_line(error: Exception) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of the vocabulary mapping: two tokenizers with the same fingerprint give the same ids."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def check_same_vocabulary(teacher_tokenizer, student_tokenizer) -> str:
    """The shared tokenizer fingerprint: token ids must mean the same to teacher and student.

    Compares the vocabulary mapping (not the class name); a one-line UsageError names the
    sizes and the first differing tokens otherwise.
    """
    fingerprint = tokenizer_fingerprint(student_tokenizer)
    if tokenizer_fingerprint(teacher_tokenizer) == fingerprint:
        return fingerprint
    teacher_vocab, student_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    differing = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda item: (item[1], item[0]))
    first = []
    for token in dict.fromkeys(token for token, _ in differing):
        first.append(f"{token!r} is {teacher_vocab.get(token)} in the teacher and {student_vocab.get(token)} in the student")
        if len(first) == 3:
            break
    raise UsageError(
        f"teacher and student do not share a vocabulary (the teacher has {len(teacher_vocab)} tokens, "
        f"the student {len(student_vocab)}; {'; '.join(first)}); distillation compares their distributions token by token"
    )


@dataclass(frozen=True)
class TinySize:
    """The shape of one embedded tiny GPT-2 model."""

    n_layer: int
    n_embd: int
    n_head: int


TINY_TEACHER = TinySize(n_layer=4, n_embd=128, n_head=4)
TINY_STUDENT = TinySize(n_layer=2, n_embd=64, n_head=2)


def write_gpt2_tokenizer(out_dir: Path) -> None:
    """Write the real GPT-2 tokenizer (shipped vocab.json + merges.txt) in Hugging Face layout."""
    from transformers import AutoTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    assets = resources.files("mgsr_cli.assets") / "gpt2_tokenizer"
    for name in ("vocab.json", "merges.txt"):
        with resources.as_file(assets / name) as source:
            shutil.copyfile(source, out_dir / name)
    config_path = out_dir / "config.json"
    if not config_path.exists():  # AutoTokenizer needs the model type to pick the GPT-2 class
        config_path.write_text(json.dumps({"model_type": "gpt2"}))
    AutoTokenizer.from_pretrained(str(out_dir)).save_pretrained(str(out_dir))


def build_tiny_gpt2(out_dir: Path, size: TinySize, seed: int, vocab_size: int = 50257, n_positions: int = 1024) -> Path:
    """A randomly initialised GPT-2 with the real GPT-2 tokenizer, saved like any hub model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=size.n_embd,
        n_layer=size.n_layer,
        n_head=size.n_head,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    model = GPT2LMHeadModel(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    write_gpt2_tokenizer(out_dir)
    return out_dir


def build_tiny_pair(out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """The embedded default: a 4-layer teacher and a 2-layer student under out_dir/{teacher,student}."""
    teacher = build_tiny_gpt2(out_dir / "teacher", TINY_TEACHER, seed)
    student = build_tiny_gpt2(out_dir / "student", TINY_STUDENT, seed + 1)
    return teacher, student


def load_model_as(name: str, loading: ModelLoading):
    """Model in eval mode on the device and in the dtype `loading` resolves to."""
    device = resolve_device(loading.device)
    return load_model(name, resolve_dtype(loading.dtype, device), device, loading.trust_remote_code)


def load_model_and_tokenizer(name: str, loading: ModelLoading):
    """Model in eval mode on the resolved device, with its left-padding tokenizer."""
    tokenizer = load_tokenizer(name, loading.trust_remote_code)
    return load_model_as(name, loading), tokenizer


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)
