""""sdpa_packed": PyTorch's scaled_dot_product_attention run once per packed sample.

A packed row holds several samples one after another, their position ids restarting at each. With
plain "sdpa", transformers confines attention to each sample by building a block-diagonal mask over the
whole row, and the kernel computes every query-key pair of the row (most of them masked): for TRIM's
short samples, ~6 of them in a row of 1024, that is several times the attention a sample needs. Here
the row is cut where its position ids stop counting up by one (transformers' own rule for packed
sequences) and each piece runs causal sdpa on its own, so attention costs the sum of the samples'
squares and no mask is built (benchmarks/README.md has the step times).

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
    rows = []
    for r, row in enumerate(spans):
        pieces = [sdpa_attention_forward(module, query[r:r + 1, :, s:e], key[r:r + 1, :, s:e],
                                         value[r:r + 1, :, s:e], None, dropout=dropout, scaling=scaling,
                                         **kwargs)[0] for s, e in row]
        rows.append(torch.cat(pieces, dim=1))
    return torch.cat(rows, dim=0), None


AttentionInterface.register(NAME, packed_sdpa_forward)
AttentionMaskInterface.register(NAME, _mask)
