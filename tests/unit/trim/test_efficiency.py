"""Analytic LLM costs, checked against arithmetic written out by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from transformers import LlamaConfig

from trim.efficiency import (
    LLAVA_15_7B,
    LLAVA_15_13B,
    MIB,
    EfficiencyRow,
    LlmShape,
    attention_pairs,
    efficiency_rows,
    format_table,
    kv_cache_bytes,
    layer_flops,
    prefill_flops,
    token_budget,
    trim_visual_tokens,
)


def hand_7b_prefill(t: int) -> int:
    """vicuna-7b prefill FLOPs, written out: 2 FLOPs per multiply-add."""
    projections = 2 * t * 4096 * 4096 * 4           # q, k, v, o: all 4096 x 4096 (32 kv heads)
    mlp = 2 * t * 4096 * 11008 * 3                  # gate, up, down
    causal_pairs = t * (t + 1) // 2                 # query i sees keys 0..i
    attention = 2 * causal_pairs * 128 * 32 * 2     # (Q.K^T and P.V) x 32 heads x head_dim 128
    lm_head = 2 * 4096 * 32000                      # last position only
    return 32 * (projections + mlp + attention) + lm_head


def test_7b_one_token():
    # 32 * (134,217,728 + 270,532,608 + 16,384) + 262,144,000
    assert prefill_flops(LLAVA_15_7B, 1) == 32 * (134_217_728 + 270_532_608 + 16_384) + 262_144_000
    assert prefill_flops(LLAVA_15_7B, 1) == 13_214_679_040   # ~2 x 6.6e9 params touched per token


@pytest.mark.parametrize("t", [1, 2, 40, 161, 616])
def test_7b_prefill_matches_hand_arithmetic(t):
    assert prefill_flops(LLAVA_15_7B, t) == hand_7b_prefill(t)


def test_7b_full_prompt_figure():
    # 576 visual + 40 question tokens = 616 tokens.
    t = 616
    per_layer = 2 * t * 4096 * 4096 * 4 + 2 * t * 4096 * 11008 * 3 + 4 * 4096 * (t * (t + 1) // 2)
    # 616 * 134,217,728 + 616 * 270,532,608 + 16,384 * (616 * 617 / 2 = 190,036)
    assert per_layer == 82_678_120_448 + 166_648_086_528 + 3_113_549_824
    assert prefill_flops(LLAVA_15_7B, t) == 32 * per_layer + 262_144_000
    assert prefill_flops(LLAVA_15_7B, t) / 1e12 == pytest.approx(8.0783, abs=1e-4)


def test_non_causal_and_all_logits_options():
    t = 10
    causal = prefill_flops(LLAVA_15_7B, t)
    full = prefill_flops(LLAVA_15_7B, t, causal=False)
    # the extra attention: 32 layers x 4 * 4096 FLOPs x (T*T - T*(T+1)/2) pairs
    assert full - causal == 32 * 4 * 4096 * (100 - 55)
    assert prefill_flops(LLAVA_15_7B, t, all_logits=True) - causal == 2 * 4096 * 32000 * (t - 1)
    assert attention_pairs(t) == 55 and attention_pairs(t, causal=False) == 100


def test_kv_cache_7b_is_half_a_mib_per_token():
    # 2 (K, V) * 32 layers * 32 kv heads * 128 head_dim * 2 bytes = 524,288 bytes = 0.5 MiB
    assert kv_cache_bytes(LLAVA_15_7B, 1) == 2 * 32 * 32 * 128 * 2 == MIB // 2
    assert kv_cache_bytes(LLAVA_15_7B, 616) == 616 * MIB // 2           # 308 MiB
    assert kv_cache_bytes(LLAVA_15_7B, 616, bytes_per_element=4) == 616 * MIB


def test_kv_cache_13b():
    # 2 * 40 * 40 * 128 * 2 = 819,200 bytes per token
    assert kv_cache_bytes(LLAVA_15_13B, 1) == 819_200


def test_from_config_gqa():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=96, vocab_size=100)
    shape = LlmShape.from_config(config)
    assert shape == LlmShape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=100)
    assert shape.dim_per_head == 16
    t = 5
    # q, o: 64 x 64; k, v: 64 x (2 kv heads * 16) = 64 x 32
    projections = 2 * t * 64 * 64 * 2 + 2 * t * 64 * 32 * 2
    mlp = 2 * t * 64 * 96 * 3
    attention = 2 * 2 * 4 * 16 * (5 * 6 // 2)
    assert layer_flops(shape, t) == projections + mlp + attention
    assert prefill_flops(shape, t) == 2 * (projections + mlp + attention) + 2 * 64 * 100
    assert kv_cache_bytes(shape, t) == 2 * 2 * 2 * 16 * t * 2


def test_from_config_explicit_head_dim_and_llava_text_config():
    config = LlamaConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=96, vocab_size=100, head_dim=32)
    assert LlmShape.from_config(config).dim_per_head == 32

    class Wrapper:  # LlavaConfig-like: the language model's config under text_config
        text_config = config

    assert LlmShape.from_config(Wrapper()) == LlmShape.from_config(config)


def test_presets_match_vicuna_configs():
    vicuna_7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, intermediate_size=11008, vocab_size=32000)
    assert LlmShape.from_config(vicuna_7b) == LLAVA_15_7B
    assert (LLAVA_15_13B.hidden, LLAVA_15_13B.layers, LLAVA_15_13B.dim_per_head) == (5120, 40, 128)


def test_shape_validation():
    with pytest.raises(ValueError, match="kv_heads"):
        LlmShape(hidden=64, layers=1, heads=4, kv_heads=3, intermediate=8, vocab=8)
    with pytest.raises(ValueError, match="layers"):
        LlmShape(hidden=64, layers=0, heads=4, kv_heads=4, intermediate=8, vocab=8)
    with pytest.raises(ValueError, match=">= 0"):
        prefill_flops(LLAVA_15_7B, -1)


@given(st.integers(0, 5000))
def test_monotone_in_tokens(t):
    assert prefill_flops(LLAVA_15_7B, t + 1) > prefill_flops(LLAVA_15_7B, t)
    assert kv_cache_bytes(LLAVA_15_7B, t + 1) - kv_cache_bytes(LLAVA_15_7B, t) == MIB // 2


def test_token_budget_and_trim_tokens():
    assert token_budget(576, 40, 35) == 651
    assert token_budget(121, 40) == 161
    with pytest.raises(ValueError, match="question_tokens"):
        token_budget(576, -1)
    # released rounding: int(576 * 0.21) = int(120.96) = 120 kept, + 1 aggregate
    assert trim_visual_tokens(0.21) == 121
    assert trim_visual_tokens(0.05) == 29          # 28 kept + 1, as `TRIM:0.05`
    assert trim_visual_tokens(0.05, aggregate=False) == 28


def test_efficiency_rows_7b():
    full, trim = efficiency_rows(LLAVA_15_7B, question_tokens=40, visual_trim=121)
    assert isinstance(full, EfficiencyRow)
    assert (full.label, full.visual_tokens, full.total_tokens) == ("full", 576, 616)
    assert (trim.label, trim.visual_tokens, trim.total_tokens) == ("TRIM", 121, 161)
    assert full.prefill_tflops == pytest.approx(hand_7b_prefill(616) / 1e12)
    assert trim.prefill_tflops == pytest.approx(hand_7b_prefill(161) / 1e12)
    assert full.kv_cache_mib == pytest.approx(308.0)
    assert trim.kv_cache_mib == pytest.approx(80.5)
    assert (full.token_ratio, full.flops_ratio, full.kv_ratio) == (1.0, 1.0, 1.0)
    assert trim.token_ratio == pytest.approx(161 / 616)
    assert trim.kv_ratio == pytest.approx(161 / 616)
    assert trim.flops_ratio == pytest.approx(hand_7b_prefill(161) / hand_7b_prefill(616))


def test_format_table():
    rows = efficiency_rows(LLAVA_15_7B, question_tokens=40, visual_trim=121)
    lines = format_table(rows).splitlines()
    assert len(lines) == 3
    assert "prefill TFLOPs" in lines[0] and "KV cache MiB" in lines[0]
    assert lines[1].startswith("full") and "616" in lines[1] and "308.0" in lines[1]
    assert lines[2].startswith("TRIM") and "161" in lines[2] and "80.5" in lines[2]
    assert len({len(line) for line in lines}) == 1  # columns aligned
