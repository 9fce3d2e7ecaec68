"""Analytic prefill cost and KV-cache size of a Llama-architecture LLM, with and without TRIM.

Counting conventions (used everywhere in this module):
- a multiply-add is 2 FLOPs; a [T, a] x [a, b] matmul is 2*T*a*b;
- per layer: q, k, v, o projections (k and v sized by the KV heads, so GQA is counted), the SwiGLU
  MLP's three matrices (gate, up, down), and attention's two matmuls (scores Q.K^T and the weighted
  sum over V) counted over the CAUSAL pairs only: query i attends to keys 0..i, T*(T+1)/2 pairs,
  which is what a causal kernel computes (pass causal=False for the full T*T);
- the LM head is counted on the last position only (generation needs only its logits; pass
  all_logits=True for all T positions, as a training forward does);
- not counted: embeddings (a lookup), norms, rotary embeddings, softmax, SiLU, residual adds (all
  O(T*hidden), under 1% here), and the vision tower and projector, which are the same with and
  without TRIM (TRIM adds a CLIP text-encoder pass of at most 77 tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MIB = 1 << 20


@dataclass(frozen=True)
class LlmShape:
    """The sizes of a decoder-only Llama-style model that its cost depends on."""

    hidden: int
    """Model width (hidden_size)."""
    layers: int
    """Number of decoder layers (num_hidden_layers)."""
    heads: int
    """Query heads (num_attention_heads)."""
    kv_heads: int
    """Key/value heads (num_key_value_heads); fewer than `heads` under GQA."""
    intermediate: int
    """SwiGLU MLP width (intermediate_size)."""
    vocab: int
    """Vocabulary size (LM-head rows)."""
    head_dim: int | None = None
    """Per-head size; None means hidden // heads (the Llama default)."""

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "vocab"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LlmShape.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.hidden % self.heads:
            raise ValueError(f"hidden={self.hidden} is not divisible by heads={self.heads}; "
                             "give head_dim")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads={self.heads} is not a multiple of kv_heads={self.kv_heads}")

    @property
    def dim_per_head(self) -> int:
        """The per-head size actually used (head_dim or hidden // heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden // self.heads

    @classmethod
    def from_config(cls, config: Any) -> LlmShape:
        """Read a transformers LlamaConfig-like object (or a LLaVA config, via its text_config)."""
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None)
        if head_dim is not None and head_dim == text.hidden_size // heads:
            head_dim = None  # the default: keep presets and configs comparing equal
        return cls(hidden=text.hidden_size, layers=text.num_hidden_layers, heads=heads,
                   kv_heads=kv_heads, intermediate=text.intermediate_size, vocab=text.vocab_size,
                   head_dim=head_dim)


LLAVA_15_7B = LlmShape(hidden=4096, layers=32, heads=32, kv_heads=32, intermediate=11008,
                       vocab=32000)
"""vicuna-7b-v1.5, the language model of LLaVA-1.5-7B."""

LLAVA_15_13B = LlmShape(hidden=5120, layers=40, heads=40, kv_heads=40, intermediate=13824,
                        vocab=32000)
"""vicuna-13b-v1.5, the language model of LLaVA-1.5-13B."""


def _check_tokens(tokens: int) -> None:
    if tokens < 0:
        raise ValueError(f"token count must be >= 0, got {tokens}")


def attention_pairs(tokens: int, causal: bool = True) -> int:
    """Query-key pairs attention computes: T*(T+1)/2 when causal, T*T otherwise."""
    _check_tokens(tokens)
    return tokens * (tokens + 1) // 2 if causal else tokens * tokens


def layer_flops(shape: LlmShape, tokens: int, causal: bool = True) -> int:
    """FLOPs of one decoder layer over a prompt of `tokens` tokens (module conventions)."""
    _check_tokens(tokens)
    q_width = shape.heads * shape.dim_per_head
    kv_width = shape.kv_heads * shape.dim_per_head
    projections = 2 * tokens * shape.hidden * (2 * q_width + 2 * kv_width)  # q, o + k, v
    mlp = 3 * 2 * tokens * shape.hidden * shape.intermediate
    # Q.K^T and P.V: each is one dim_per_head-long multiply-add per head per pair.
    attention = 2 * 2 * shape.heads * shape.dim_per_head * attention_pairs(tokens, causal)
    return projections + mlp + attention


def prefill_flops(shape: LlmShape, tokens: int, causal: bool = True,
                  all_logits: bool = False) -> int:
    """FLOPs to prefill a prompt of `tokens` tokens: all layers plus the LM head (last position
    only unless all_logits)."""
    _check_tokens(tokens)
    head_positions = tokens if all_logits else min(tokens, 1)
    lm_head = 2 * head_positions * shape.hidden * shape.vocab
    return shape.layers * layer_flops(shape, tokens, causal) + lm_head


def kv_cache_bytes(shape: LlmShape, tokens: int, bytes_per_element: int = 2) -> int:
    """KV-cache size after `tokens` tokens: 2 (K and V) * layers * kv_heads * head_dim * T * bytes
    (fp16/bf16 = 2 bytes by default)."""
    _check_tokens(tokens)
    return 2 * shape.layers * shape.kv_heads * shape.dim_per_head * tokens * bytes_per_element


def token_budget(visual_tokens: int, question_tokens: int, system_tokens: int = 0) -> int:
    """Prompt length the LLM sees: visual tokens + question tokens + template tokens (system prompt
    and role markers; pass their tokenised length, 0 by default)."""
    for name, value in (("visual_tokens", visual_tokens), ("question_tokens", question_tokens),
                        ("system_tokens", system_tokens)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return visual_tokens + question_tokens + system_tokens


def trim_visual_tokens(kept_ratio: float, patches: int = 576, aggregate: bool = True) -> int:
    """Visual tokens TRIM hands the LLM at a kept ratio: int(patches * ratio) kept (as the released
    code rounds) plus one aggregate token."""
    if not 0.0 <= kept_ratio <= 1.0:
        raise ValueError(f"kept_ratio must be in [0, 1], got {kept_ratio}")
    return int(patches * kept_ratio) + int(aggregate)


@dataclass(frozen=True)
class EfficiencyRow:
    """One line of the with/without-TRIM comparison; ratios are relative to the full row."""

    label: str
    visual_tokens: int
    total_tokens: int
    prefill_tflops: float
    kv_cache_mib: float
    token_ratio: float
    flops_ratio: float
    kv_ratio: float


def efficiency_rows(shape: LlmShape, question_tokens: int, visual_full: int = 576, *,
                    visual_trim: int, system_tokens: int = 0,
                    bytes_per_element: int = 2) -> list[EfficiencyRow]:
    """Two rows, "full" and "TRIM": prompt tokens, prefill TFLOPs (1e12), KV cache (MiB) and their
    ratios to the full row. `visual_trim` counts every visual token the LLM sees (kept + aggregate;
    see `trim_visual_tokens`)."""
    rows = []
    base: tuple[int, int, int] | None = None
    for label, visual in (("full", visual_full), ("TRIM", visual_trim)):
        total = token_budget(visual, question_tokens, system_tokens)
        flops = prefill_flops(shape, total)
        kv = kv_cache_bytes(shape, total, bytes_per_element)
        base = base or (total, flops, kv)
        rows.append(EfficiencyRow(label=label, visual_tokens=visual, total_tokens=total,
                                  prefill_tflops=flops / 1e12, kv_cache_mib=kv / MIB,
                                  token_ratio=total / base[0] if base[0] else 0.0,
                                  flops_ratio=flops / base[1] if base[1] else 0.0,
                                  kv_ratio=kv / base[2] if base[2] else 0.0))
    return rows


_COLUMNS = (("", "label", "{}"), ("visual", "visual_tokens", "{:d}"),
            ("tokens", "total_tokens", "{:d}"), ("prefill TFLOPs", "prefill_tflops", "{:.3f}"),
            ("KV cache MiB", "kv_cache_mib", "{:.1f}"), ("tokens x", "token_ratio", "{:.3f}"),
            ("FLOPs x", "flops_ratio", "{:.3f}"), ("KV x", "kv_ratio", "{:.3f}"))


def format_table(rows: list[EfficiencyRow]) -> str:
    """A plain-text table of efficiency rows, columns right-aligned (label left-aligned)."""
    cells = [[title for title, _, _ in _COLUMNS]]
    cells += [[fmt.format(getattr(row, attr)) for _, attr, fmt in _COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(_COLUMNS))]
    lines = []
    for line in cells:
        parts = [line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)
