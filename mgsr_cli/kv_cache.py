"""Rearranging a Hugging Face KV cache in place, across transformers versions.

transformers 5 keeps a `DynamicCache` as `.layers[i].keys / .values`; 4 kept the lists
`.key_cache / .value_cache`. Both hold [B, heads, L, head_dim] tensors per layer. SCRG takes
the cache of a teacher-forced pass and keeps, for each row, only a prefix of it, moved to the
right edge (left padding), so the student can go on sampling without re-encoding.
That is exact only where the cache still holds every column it has seen as plain tensors:
full-attention layers always do; a sliding-window layer does while the sequence is shorter
than its window (it then drops the oldest columns). `reusable` says which case a cache is in.
"""

from __future__ import annotations

from torch import Tensor

# Layer classes whose `.keys / .values` are the whole [B, heads, L, head_dim] history (transformers 5).
_PLAIN_LAYERS = ("DynamicLayer", "DynamicSlidingWindowLayer")


def reusable(cache) -> bool:
    """True when every layer holds its whole history: cutting and moving columns is then exact."""
    if hasattr(cache, "layers"):
        return all(
            type(layer).__name__ in _PLAIN_LAYERS and layer.keys.shape[-2] == getattr(layer, "cumulative_length", layer.keys.shape[-2])
            for layer in cache.layers
        )
    return type(cache).__name__ == "DynamicCache" and hasattr(cache, "key_cache")  # transformers 4: plain lists


def layer_states(cache) -> list[tuple[Tensor, Tensor]]:
    """(keys, values) per layer, each [B, heads, L, head_dim]; only for a `reusable` cache."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def set_layer_states(cache, states: list[tuple[Tensor, Tensor]]) -> None:
    """Replace every layer's keys and values (the cache object stays the one the model uses);
    a sliding-window layer's count of columns seen becomes the new width, as after a fresh encode."""
    if hasattr(cache, "layers"):
        for layer, (keys, values) in zip(cache.layers, states, strict=True):
            layer.keys, layer.values = keys, values
            if hasattr(layer, "cumulative_length"):
                layer.cumulative_length = keys.shape[-2]
    else:
        cache.key_cache[:] = [keys for keys, _ in states]
        cache.value_cache[:] = [values for _, values in states]


def select_positions(cache, rows: Tensor, columns: Tensor) -> None:
    """Keep cache rows `rows` [B'] and, for each, the sequence columns `columns[b]` [B', L'], in place.

    Row b of the result holds the old row rows[b] at columns[b][0], columns[b][1], ...; columns
    that stand for padding may point anywhere valid, the attention mask hides them.
    Only for a `reusable` cache.
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
