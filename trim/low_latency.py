"""Greedy generation with little per-token overhead: a static KV cache, prompts padded to fixed shape
buckets, and (on CUDA) prefill and decode replayed from captured CUDA graphs. One prompt at a time (the
time to first token) or a batch of them (evaluation throughput: the decode steps, which cost a 7B model
the same for a 576-token prompt as for a 122-token one, are one graph replay each instead of ~200
kernel launches).

At batch 1 a 7B model's eager forward is bound by kernel launches, so TRIM's shorter prompt barely
shortens the time to first token; replaying a captured graph removes the launch overhead.
A graph needs fixed shapes and fixed addresses, so:

- the KV cache is a transformers `StaticCache` of `batch_size` rows and `capacity` slots, allocated once;
- the prompts of a batch are LEFT-padded to the smallest bucket L >= the longest: a prompt of n tokens
  fills slots L-n .. L-1 with positions 0 .. n-1, so the first token's logits are those of the last
  slot, and decoding continues at slot L with position n; the padding slots are masked out of every
  row; a batch of fewer prompts than `batch_size` fills its spare rows with one padding slot each;
- a batch whose padding would exceed PACKED_PREFILL_PADDING is prefilled without it (eagerly: at
  batch 16 a prefill is bound by compute, not launches): the prompts run as one packed row, position
  ids restarting at each and attention confined to each ("sdpa_packed", trim/attention.py), and
  their keys and values are then written to each row's slots, the layout a padded prefill leaves.
  TRIM's counts vary by image, and a padded batch would run every row at its longest prompt's length;
- attention reads only the slots a bucket can reach (the cache hands it the first L slots in the
  prefill, the first `window(L)` = L + max_new_tokens, rounded up, while decoding), not all
  `capacity`: a short prompt does not pay for the longest bucket's keys;
- every forward gets an explicit 4D additive mask (0 where attended, the dtype's minimum elsewhere),
  computed on the device from device-side counters, so transformers' mask builder (which reads
  tensor values) is never called;
- one graph per bucket for prefill and one for decode (it advances its own counters and writes the
  next token into a static buffer, so a decode loop is replays and one host read per token).

Off CUDA the same functions run eagerly (the static cache and the buckets still apply), so the CPU
tests check what the graphs replay. Greedy = argmax, no logits processors: the answers equal
`LlavaTrim.generate`'s (which runs transformers' `generate` with do_sample=False) up to float noise
in the reductions, which does not move an argmax short of a near tie.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import DynamicCache

from trim.attention import NAME as PACKED_ATTENTION
from trim.static_cache import BucketCache, counters, default_buckets, no_grad_mode, rewind

logger = logging.getLogger(__name__)

PACKED_PREFILL_PADDING = 0.1
"""A batch is prefilled packed when a padded prefill would spend more than this share of its
positions on padding: measured on an H200 (7B, batch 16), the packed prefill costs ~7% more than
an unpadded one (one attention call per prompt, the keys and values copied into the cache), and
a padded one computes its padding in vain."""
_DECODE_WARMUP = 2
"""Decode steps run before a decode graph is captured (they need free cache slots)."""


class LowLatencyGenerator:
    """Greedy decoding of prompts given as embeddings (inputs_embeds), `batch_size` at a time, on a
    causal LM: static cache, bucketed prompt shapes, CUDA graphs when on CUDA.

        generator = LowLatencyGenerator(model.llm, max_new_tokens=16, max_prompt_tokens=1024)
        tokens = generator.generate(embeds, max_new_tokens=16, eos_token_id=2)  # embeds [1, n, H] or [n, H]
        batched = LowLatencyGenerator(model.llm, max_new_tokens=16, batch_size=16)
        rows = batched.generate_batch([embeds_a, embeds_b], max_new_tokens=16, eos_token_id=2)

    `prefill` and `step` expose the two halves (time to first token, time per token); with a batch,
    `prefill_batch` and `step_batch`."""

    def __init__(self, llm, max_new_tokens: int = 16, max_prompt_tokens: int = 1024,
                 buckets: Sequence[int] | None = None, use_graphs: bool | None = None, batch_size: int = 1):
        """buckets: prompt lengths prompts are padded to (default: multiples of 16 up to
        max_prompt_tokens); use_graphs: capture CUDA graphs (default: when the LLM is on CUDA);
        batch_size: the rows every forward runs (fewer prompts leave rows idle)."""
        config = llm.config
        if config._attn_implementation not in ("sdpa", "eager"):
            raise ValueError(f"the low-latency path passes its own 4D masks: it needs 'sdpa' or 'eager' attention, "
                             f"not {config._attn_implementation!r}")
        if max_new_tokens < 1 or batch_size < 1:
            raise ValueError(f"max_new_tokens and batch_size must be >= 1, got {max_new_tokens}, {batch_size}")
        self.llm = llm.eval()
        self.buckets = sorted(set(buckets or default_buckets(max_prompt_tokens)))
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.device = next(llm.parameters()).device
        self.dtype = next(llm.parameters()).dtype
        self.use_graphs = self.device.type == "cuda" if use_graphs is None else use_graphs
        if self.use_graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the LLM on a CUDA device")
        # Decode warm-up steps (run before a capture) write past the longest generation: room for them;
        # a multiple of 16 keeps the mask rows aligned for the fused attention kernels.
        self.capacity = -(-(self.buckets[-1] + max_new_tokens + _DECODE_WARMUP) // 16) * 16
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        with no_grad_mode():
            self.cache = BucketCache(config=config, max_cache_len=self.capacity)
            if any(getattr(layer, "is_sliding", False) for layer in self.cache.layers):
                raise ValueError("sliding-window layers are not supported by the low-latency path")
            self.cache.early_initialization(batch_size=batch_size, num_heads=config.num_key_value_heads,
                                            head_dim=head_dim, dtype=self.dtype, device=self.device)
            long = dict(dtype=torch.long, device=self.device)
            self._embeds = torch.zeros(batch_size, self.buckets[-1], config.hidden_size, dtype=self.dtype,
                                       device=self.device)
            self._start = torch.zeros(batch_size, **long)  # each row's first real slot (= bucket - n)
            self._slot = torch.zeros((), **long)  # the cache slot the next tokens are written to
            self._position = torch.zeros(batch_size, 1, **long)  # each row's next position id
            self._token = torch.zeros(batch_size, 1, **long)  # each row's last generated token
            self._columns = torch.arange(self.capacity, **long)
        self._prefill_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._decode_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._bucket = self.buckets[0]  # the bucket of the prompts in the cache
        self._generated = max_new_tokens  # no step before a prefill
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        # Several prompts: prefilled packed (no padding) where that is cheaper and the cache's write
        # positions can be set.
        self.packed_prefill = batch_size > 1 and counters(self.cache) is not None

    # What each replay runs: only static buffers in, only static buffers out ------------------------

    def _mask(self, visible: torch.Tensor) -> torch.Tensor:
        """[B, 1, Q, K] additive mask from a [B, Q, K] bool."""
        hidden = torch.full((), torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)
        return torch.where(visible, torch.zeros((), dtype=self.dtype, device=self.device), hidden)[:, None]

    def _prefill_fn(self, bucket: int) -> None:
        rewind(self.cache)
        columns = self._columns[:bucket]
        rows, start = columns[:, None], self._start[:, None, None]
        # Real rows see the real slots up to themselves; a padding row sees itself only (no empty row).
        visible = (columns <= rows) & ((columns >= start) | (columns == rows))
        positions = (columns - self._start[:, None]).clamp(min=0)
        self.cache.visible = bucket
        try:
            out = self.llm(inputs_embeds=self._embeds[:, :bucket], attention_mask=self._mask(visible),
                           position_ids=positions, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            self.cache.visible = None
        self._token.copy_(out.logits[:, -1].argmax(dim=-1, keepdim=True))
        self._position.copy_(bucket - self._start[:, None])
        self._slot.fill_(bucket)

    def window(self, bucket: int) -> int:
        """The cache slots decoding after a prompt of this bucket reads (room for the capture's warm-up
        steps too; a multiple of 16, as the capacity)."""
        return min(self.capacity, -(-(bucket + self.max_new_tokens + _DECODE_WARMUP) // 16) * 16)

    def _decode_fn(self, bucket: int) -> None:
        columns = self._columns[:self.window(bucket)]
        visible = ((columns >= self._start[:, None]) & (columns <= self._slot))[:, None]
        self.cache.visible = columns.shape[0]
        try:
            out = self.llm(input_ids=self._token, attention_mask=self._mask(visible), position_ids=self._position,
                           past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        finally:
            self.cache.visible = None
        self._token.copy_(out.logits[:, -1].argmax(dim=-1, keepdim=True))
        self._position.add_(1)
        self._slot.add_(1)

    def _prefill_packed(self, rows: list[torch.Tensor], bucket: int) -> None:
        """The prompts' prefill as one packed row (see the module doc); leaves the cache, the tokens and
        the counters as _prefill_fn does for the same prompts left-padded to `bucket`."""
        device, lengths = self.device, [r.shape[0] for r in rows]
        packed = torch.cat(rows)[None]
        positions = torch.cat([torch.arange(n) for n in lengths]).to(device)[None]
        last = (torch.tensor(lengths).cumsum(0) - 1).to(device)
        fresh = DynamicCache()
        attn = self.llm.config._attn_implementation
        self.llm.config._attn_implementation = PACKED_ATTENTION
        try:
            out = self.llm(inputs_embeds=packed, position_ids=positions, past_key_values=fresh, use_cache=True,
                           logits_to_keep=last)
        finally:
            self.llm.config._attn_implementation = attn
        row = torch.cat([torch.full((n,), b, dtype=torch.long) for b, n in enumerate(lengths)]).to(device)
        slot = torch.cat([torch.arange(bucket - n, bucket) for n in lengths]).to(device)
        for static, layer in zip(self.cache.layers, fresh.layers):
            targets: Any = static
            sources: Any = layer
            targets.keys[row, :, slot] = sources.keys[0].transpose(0, 1).to(targets.keys.dtype)
            targets.values[row, :, slot] = sources.values[0].transpose(0, 1).to(targets.values.dtype)
        for counter in counters(self.cache) or []:
            counter.fill_(bucket)
        self._token[:len(rows), 0] = out.logits[0].argmax(dim=-1)
        self._position.copy_(bucket - self._start[:, None])
        self._slot.fill_(bucket)

    def _capture(self, fn: Callable[[], None], warmup: int) -> torch.cuda.CUDAGraph:
        """Warm fn up on a side stream (lazy allocations, library handles), then capture it."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            fn()
        return graph

    # The public halves ---------------------------------------------------------------------------

    def bucket_for(self, prompt_tokens: int) -> int | None:
        """The bucket a prompt of this length is padded to, None if it is longer than every bucket."""
        return next((b for b in self.buckets if b >= prompt_tokens), None)

    def prefill_batch(self, prompts: Sequence[torch.Tensor]) -> list[int]:
        """Fill the cache with up to batch_size prompts' embeddings (each [1, n, H] or [n, H]); returns
        each prompt's first token."""
        if not 1 <= len(prompts) <= self.batch_size:
            raise ValueError(f"prefill takes 1 to {self.batch_size} prompts, got {len(prompts)}")
        with no_grad_mode():
            rows = [p.reshape(-1, p.shape[-1]) for p in prompts]
            longest = max(r.shape[0] for r in rows)
            bucket = self.bucket_for(longest)
            if bucket is None or min(r.shape[0] for r in rows) == 0:
                raise ValueError(f"prompts of {sorted({r.shape[0] for r in rows})} tokens do not fit the buckets "
                                 f"(1 to {self.buckets[-1]})")
            lengths = [r.shape[0] for r in rows] + [1] * (self.batch_size - len(rows))  # a spare row: one slot
            self._start.copy_(torch.tensor([bucket - n for n in lengths], dtype=torch.long))
            padding = 1 - sum(lengths[:len(rows)]) / (self.batch_size * bucket)  # of a padded prefill
            packed = self.packed_prefill and padding > PACKED_PREFILL_PADDING
            if not packed:  # the padded prefill's input: each prompt at the end of its row's bucket
                for b, n in enumerate(lengths):
                    self._embeds[b, :bucket - n].zero_()
                    if b < len(rows):
                        self._embeds[b, bucket - n:bucket].copy_(rows[b])
                    else:
                        self._embeds[b, bucket - 1].zero_()
            if packed:
                if self.use_graphs and bucket not in self._decode_graphs:
                    # Captured once the cache holds a prefill (its warm-up steps decode after it).
                    self._prefill_packed(rows, bucket)
                    self._decode_graphs[bucket] = self._capture(lambda: self._decode_fn(bucket), warmup=_DECODE_WARMUP)
                self._prefill_packed(rows, bucket)
            elif not self.use_graphs:
                self._prefill_fn(bucket)
            else:
                if bucket not in self._prefill_graphs:
                    logger.info("capturing the prefill graph of bucket %d, batch %d", bucket, self.batch_size)
                    self._prefill_graphs[bucket] = self._capture(lambda: self._prefill_fn(bucket), warmup=2)
                if bucket not in self._decode_graphs:
                    # Captured once the cache holds a prefill (its warm-up steps decode after it).
                    self._prefill_graphs[bucket].replay()
                    self._decode_graphs[bucket] = self._capture(lambda: self._decode_fn(bucket), warmup=_DECODE_WARMUP)
                self._prefill_graphs[bucket].replay()  # also resets every counter the warm-ups moved
            self._bucket = bucket
            self._generated = 1
            return self._token[:len(rows), 0].tolist()

    def step_batch(self) -> list[int]:
        """One decode step of every row after `prefill_batch` (or the previous step); returns each
        row's new token (the spare rows' included)."""
        if self._generated >= self.max_new_tokens:
            raise ValueError(f"the cache holds {self.max_new_tokens} generated tokens at most")
        with no_grad_mode():
            if self.use_graphs:
                self._decode_graphs[self._bucket].replay()
            else:
                self._decode_fn(self._bucket)
            self._generated += 1
            return self._token[:, 0].tolist()

    def prefill(self, embeds: torch.Tensor) -> int:
        """Fill the cache with one prompt's embeddings ([1, n, H] or [n, H]); returns the first token."""
        return self.prefill_batch([embeds])[0]

    def step(self) -> int:
        """One decode step after `prefill` (or the previous step); returns the new token."""
        return self.step_batch()[0]

    def generate_batch(self, prompts: Sequence[torch.Tensor], max_new_tokens: int,
                       eos_token_id: int) -> list[list[int]]:
        """Greedy tokens after each prompt (up to batch_size of them), each row stopping at eos (not
        included) or after max_new_tokens; the batch steps until every row has stopped."""
        if not 1 <= max_new_tokens <= self.max_new_tokens:
            raise ValueError(f"max_new_tokens must be in [1, {self.max_new_tokens}], got {max_new_tokens}")
        rows = [[token] for token in self.prefill_batch(prompts)]
        done = [row[-1] == eos_token_id for row in rows]
        for _ in range(max_new_tokens - 1):
            if all(done):
                break
            for b, token in enumerate(self.step_batch()[:len(rows)]):
                if not done[b]:
                    rows[b].append(token)
                    done[b] = token == eos_token_id
        return [row[:-1] if row[-1] == eos_token_id else row for row in rows]

    def generate(self, embeds: torch.Tensor, max_new_tokens: int, eos_token_id: int) -> list[int]:
        """Greedy tokens after one prompt, stopping at eos (not included) or after max_new_tokens."""
        return self.generate_batch([embeds], max_new_tokens, eos_token_id)[0]
