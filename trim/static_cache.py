"""The pieces of a static KV cache the low-latency generator replays graphs over (trim/low_latency.py):
prompt-length buckets, a cache that shows attention only a bucket's slots, and its write counters.

The counters: transformers 5.x static cache layers count their write position in a device tensor, so
a cache is rewound by zeroing them (the stale keys stay, masked) and a captured graph advances them.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from transformers import StaticCache

DEFAULT_BUCKET_STEP = 8
"""Prompt lengths are padded up to a multiple of this by default: at most 7 padding positions (~3% of
a TRIM prompt; at batch 1 a 7B prefill costs about linearly in them), at the price of more graphs."""


def default_buckets(max_prompt_tokens: int, step: int = DEFAULT_BUCKET_STEP) -> list[int]:
    """Bucket lengths step, 2*step, ... up to the first >= max_prompt_tokens."""
    if max_prompt_tokens < 1 or step < 1:
        raise ValueError(f"need max_prompt_tokens >= 1 and step >= 1, got {max_prompt_tokens}, {step}")
    return list(range(step, max_prompt_tokens + step, step))


def no_grad_mode() -> ExitStack:
    """no_grad, and never inference mode: the static buffers are updated in place across calls, which
    inference tensors forbid outside inference mode."""
    stack = ExitStack()
    stack.enter_context(torch.inference_mode(False))
    stack.enter_context(torch.no_grad())
    return stack


class BucketCache(StaticCache):
    """A StaticCache whose update hands the attention only the first `visible` slots when set (the
    prefill's bucket); the tensors it writes to are the full ones."""

    visible: int | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        if self.visible is None:
            return keys, values
        return keys[:, :, :self.visible], values[:, :, :self.visible]


def counters(cache: StaticCache) -> list[torch.Tensor] | None:
    """Each layer's write position (transformers 5.x static layers count in a device tensor), or
    None where a layer does not."""
    counters = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
    return counters if all(isinstance(c, torch.Tensor) for c in counters) else None  # type: ignore[return-value]


def rewind(cache: StaticCache) -> None:
    """An empty cache again: every layer's write position back to 0 (the stale keys stay, masked).
    transformers 5.x static layers count in a device tensor; otherwise the public reset (which also
    zeroes the keys and values)."""
    counters = [getattr(layer, "cumulative_length", None) for layer in cache.layers]
    tensors = [c for c in counters if isinstance(c, torch.Tensor)]
    if len(tensors) < len(counters):
        cache.reset()
        return
    for counter in tensors:
        counter.zero_()
