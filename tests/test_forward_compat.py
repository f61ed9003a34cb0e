"""mgsr's own forwards pass the KV cache under the name the installed transformers takes, so
they raise no deprecation warning (the old `past_key_values` keyword goes away in 5.40)."""

from __future__ import annotations

import warnings

import torch

from mgsr_cli.heads import hidden_states
from mgsr_cli.models import load_model
from mgsr_cli.sampling import forward_step, position_ids_from_mask


def test_cached_forwards_raise_no_future_warning(tiny_pair):
    model = load_model(str(tiny_pair[1]), torch.float32, torch.device("cpu"), False)
    ids = torch.tensor([[5, 6, 7, 8]])
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        hidden, cache = hidden_states(model, ids, mask, position_ids_from_mask(mask), use_cache=True)
        logits, cache = forward_step(model, ids[:, :3], mask[:, :3], position_ids_from_mask(mask[:, :3]))
        next_logits, _ = forward_step(model, ids[:, 3:], mask, position_ids_from_mask(mask)[:, 3:], cache)
    assert hidden.shape[:2] == (1, 4) and cache is not None
    full = model(input_ids=ids).logits[:, -1]
    torch.testing.assert_close(next_logits, full, rtol=1e-5, atol=1e-5)  # the reused cache is the real one
