"""Rearranging a Hugging Face KV cache in place, across transformers versions.

transformers v5 keeps a `DynamicCache` as `.layers[i].keys / .values`; v4 kept the lists
`.key_cache / .value_cache`. Both hold [B, heads, L, head_dim] tensors per layer. SCRG takes
the cache of a teacher-forced pass and keeps, for each row, only a prefix of it, moved to the
right edge (left padding), so the student can go on sampling from there without re-encoding.
"""

from __future__ import annotations

from torch import Tensor

from mgsr_cli.errors import UsageError


def layer_states(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer, each [B, heads, L, head_dim]."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
                raise UsageError(f"{type(layer).__name__} caches are not supported: SCRG reuses full-attention caches only")
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def set_layer_states(cache, states: list[tuple[Tensor, Tensor]]) -> None:
    """Replace every layer's keys and values (the cache object stays the one the model uses)."""
    if hasattr(cache, "layers"):
        for layer, (keys, values) in zip(cache.layers, states, strict=True):
            layer.keys, layer.values = keys, values
    else:
        cache.key_cache[:] = [keys for keys, _ in states]
        cache.value_cache[:] = [values for _, values in states]


def select_positions(cache, rows: Tensor, columns: Tensor) -> None:
    """Keep cache rows `rows` [B'] and, for each, the sequence columns `columns[b]` [B', L'], in place.

    Row b of the result holds the old row rows[b] at columns[b][0], columns[b][1], ...; columns
    that stand for padding may point anywhere valid, the attention mask hides them.
    """
    row_index = rows.to(columns.device)[:, None]
    set_layer_states(
        cache,
        [
            # advanced indexing over dims 0 and 2 puts the indexed dims first: [B', L', heads, D]
            (keys[row_index, :, columns].transpose(1, 2), values[row_index, :, columns].transpose(1, 2))
            for keys, values in layer_states(cache)
        ],
    )
