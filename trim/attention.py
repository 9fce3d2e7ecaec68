""""sdpa_packed": PyTorch's scaled_dot_product_attention run once per packed sample.

A packed row holds several samples one after another, their position ids restarting at each. With
plain "sdpa", transformers confines attention to each sample by building a block-diagonal mask over the
whole row, and the kernel computes every query-key pair of the row (most of them masked): for TRIM's
short samples, ~6 of them in a row of 1024, that is several times the attention a sample needs. Here
the row is cut where its position ids stop counting up by one (transformers' own rule for packed
sequences) and each piece runs causal sdpa on its own, so attention costs the sum of the samples'
squares and no mask is built. Measured on CPU (tiny model, micro-batch 8): a TRIM step 42.6 -> 28.1 ms,
a full one 198 -> 147 ms.

On CUDA the pieces run as one batch instead: each sample right-padded to the longest (a causal
query never sees the padding after it; the padded queries are dropped), one sdpa call a layer, so
a packed prefill of 16 prompts is 32 kernels, not 512 launches. On the CPU, where the padded work
would cost more than the calls, one call per sample.

Anything else (a padding mask, a KV cache, sliding windows or other extra masks) goes through
transformers' sdpa unchanged. Flash attention does the same per-sample cut in one varlen kernel on GPU;
this is for where it is absent (CPU). Importing this module registers the name; every path that loads
an LLM (trim/llm_loading.py) imports it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

NAME = "sdpa_packed"


def _mask(**kwargs: Any) -> torch.Tensor | None:
    """No mask where the attention can cut rows itself (no padding mask, no cache, only the causal
    pattern); transformers' sdpa mask otherwise (also whenever the call's arguments are not the ones
    this was written against, transformers 5.23's)."""
    config = kwargs.get("config")
    q_length = kwargs.get("q_length")
    plain = (kwargs.get("attention_mask") is None and q_length is not None and q_length == kwargs.get("kv_length")
             and not kwargs.get("use_vmap") and kwargs.get("local_size") is None
             and not getattr(config, "sliding_window", None))
    if plain:
        return None
    return sdpa_mask(**kwargs)


def sample_spans(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """Per row, the (start, end) of each packed sample: a sample starts where the position id is not
    the previous one plus one."""
    positions = position_ids.expand(rows, -1)
    length = positions.shape[1]
    breaks = torch.ones_like(positions, dtype=torch.bool)
    breaks[:, 1:] = positions[:, 1:] != positions[:, :-1] + 1
    spans = []
    for row in breaks.cpu():
        starts = torch.nonzero(row).squeeze(1).tolist()
        spans.append(list(zip(starts, [*starts[1:], length])))
    return spans


BATCHED_DEVICES = ("cuda",)
"""Device types where a packed row's samples run as one padded batch (see the module doc)."""

_last: tuple[torch.Tensor, int, int, list[list[tuple[int, int]]]] | None = None
"""The last position ids cut (held, so their memory cannot be reused), their version, rows, spans."""


def _spans_of(position_ids: torch.Tensor, rows: int) -> list[list[tuple[int, int]]]:
    """sample_spans, once per forward: every layer gets the same position ids tensor (and on GPU each
    cut would cost a device-to-host copy)."""
    global _last
    if _last is not None and _last[0] is position_ids and _last[1] == position_ids._version and _last[2] == rows:
        return _last[3]
    spans = sample_spans(position_ids, rows)
    _last = (position_ids, position_ids._version, rows, spans)
    return spans


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: query [B, H, L, d], key and value [B, H_kv, L, d] ->
    ([B, L, H, d], None)."""
    positions = kwargs.get("position_ids")
    if attention_mask is not None or positions is None or query.shape[2] != key.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    spans = _spans_of(positions, query.shape[0])
    if all(len(row) == 1 for row in spans):  # nothing packed: one causal call
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, **kwargs)
    if query.device.type in BATCHED_DEVICES:
        return _batched_forward(module, query, key, value, spans, dropout, scaling, **kwargs), None
    rows = []
    for r, row in enumerate(spans):
        pieces = [sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                         value[r:r + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                         **kwargs)[0] for s, e in row]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


_layout: tuple[list, torch.device, tuple[torch.Tensor, torch.Tensor, int]] | None = None
"""The last spans laid out (their list held, so the identity check holds), the device, the layout."""


def padded_layout(spans: list[list[tuple[int, int]]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For each position of the packed rows, in order: its sample's number and its offset in the
    sample; and the longest sample's length."""
    sample, offset, number, longest = [], [], 0, 1
    for row in spans:
        for start, end in row:
            sample.append(torch.full((end - start,), number, dtype=torch.long))
            offset.append(torch.arange(end - start))
            number, longest = number + 1, max(longest, end - start)
    return torch.cat(sample).to(device), torch.cat(offset).to(device), longest


def _batched_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     spans: list[list[tuple[int, int]]], dropout: float, scaling: float | None,
                     **kwargs: Any) -> torch.Tensor:
    """The packed samples as one right-padded batch through one causal sdpa call; [B, L, H, d]."""
    global _layout
    if _layout is None or _layout[0] is not spans or _layout[1] != query.device:
        _layout = (spans, query.device, padded_layout(spans, query.device))  # once per forward, not per layer
    sample, offset, longest = _layout[2]
    count = sum(len(row) for row in spans)
    rows, heads, length, dim = query.shape

    def padded(x: torch.Tensor) -> torch.Tensor:  # [B, h, L, d] -> [samples, h, longest, d]
        flat = x.transpose(1, 2).reshape(rows * length, x.shape[1], dim)
        return x.new_zeros(count, longest, x.shape[1], dim).index_put((sample, offset), flat).transpose(1, 2)

    out = sdpa_attention_forward(module, padded(query), padded(key), padded(value), None, dropout=dropout,
                                 scaling=scaling, **kwargs)[0]  # [samples, longest, H, d]
    return out[sample, offset].reshape(rows, length, heads, dim)


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, _mask)
