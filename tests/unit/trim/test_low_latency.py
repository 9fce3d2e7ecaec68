"""The low-latency generator (static cache, bucketed prompts, CUDA graphs on CUDA) against transformers'
own greedy generate on a small random Llama: the same tokens, across bucket edges, GQA, eos, errors."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trim.low_latency import LowLatencyGenerator
from trim.static_cache import default_buckets


def small_llama(device: str = "cpu", dtype: torch.dtype = torch.float32, attn: str = "sdpa", kv_heads: int = 2):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=kv_heads, intermediate_size=128, max_position_embeddings=1024)
    with torch.device(device):
        return LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype).eval()


def reference(llm, embeds: torch.Tensor, new_tokens: int, eos: int | None = None) -> list[int]:
    """transformers' greedy generate with its dynamic cache, cut before eos."""
    with torch.no_grad():
        out = llm.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long,
                                                                           device=embeds.device),
                           max_new_tokens=new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)
    tokens = out[0].tolist()
    return tokens[:tokens.index(eos)] if eos is not None and eos in tokens else tokens


@pytest.fixture(scope="module")
def llm():
    return small_llama()


def prompt(n: int, seed: int, device: str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, n, 64, generator=generator).to(device, dtype)


def test_buckets():
    assert default_buckets(130) == [8 * i for i in range(1, 18)]
    assert default_buckets(64, step=32) == [32, 64] and default_buckets(100, step=64) == [64, 128]
    with pytest.raises(ValueError):
        default_buckets(0)


@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("sdpa", 4), ("eager", 2)])
def test_a_batch_gives_each_prompt_its_own_tokens(attn, kv_heads):
    """Prompts of different lengths in one batch (left-padded to the longest's bucket, spare rows
    idle) get the tokens each gets alone from transformers; each row stops at its own eos."""
    llm = small_llama(attn=attn, kv_heads=kv_heads)
    generator = LowLatencyGenerator(llm, max_new_tokens=8, max_prompt_tokens=160, batch_size=4)
    lengths = (1, 17, 150)
    prompts = [prompt(n, seed=10 + n) for n in lengths]
    expected = [reference(llm, p, 8) for p in prompts]
    assert generator.generate_batch(prompts, 8, eos_token_id=-1) == expected
    eos = expected[1][2]  # row 1 stops after two tokens; the others run on (or stop at that token too)
    cut = [row[:row.index(eos)] if eos in row else row for row in expected]
    assert generator.generate_batch(prompts, 8, eos_token_id=eos) == cut
    assert generator.generate_batch(prompts[2:], 8, eos_token_id=-1) == expected[2:]  # 1 of 4 rows
    with pytest.raises(ValueError, match="prefill takes 1 to 4 prompts"):
        generator.prefill_batch(prompts * 2)


def test_a_batch_is_prefilled_packed_into_the_padded_layout(llm):
    """Several prompts prefill as one packed row (no padding computed) and leave the cache as the
    padded prefill does: the same keys and values in each row's real slots, the same first tokens,
    then the same decoding; the LLM's attention setting is left as it was."""
    prompts = [prompt(n, seed=20 + n) for n in (3, 40, 17)]
    packed = LowLatencyGenerator(llm, max_new_tokens=5, max_prompt_tokens=64, batch_size=4)
    padded = LowLatencyGenerator(llm, max_new_tokens=5, max_prompt_tokens=64, batch_size=4)
    padded.packed_prefill = False
    assert packed.packed_prefill
    assert packed.prefill_batch(prompts) == padded.prefill_batch(prompts)
    assert llm.config._attn_implementation == "sdpa"
    bucket = packed.bucket_for(40)
    for b, p in enumerate(prompts):
        slots = slice(bucket - p.shape[1], bucket)
        for mine, theirs in zip(packed.cache.layers, padded.cache.layers):
            torch.testing.assert_close(mine.keys[b, :, slots], theirs.keys[b, :, slots], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mine.values[b, :, slots], theirs.values[b, :, slots], rtol=1e-5, atol=1e-5)
    assert [packed.step_batch()[:3] for _ in range(4)] == [padded.step_batch()[:3] for _ in range(4)]
    assert packed.generate_batch(prompts, 5, eos_token_id=-1) == [reference(llm, p, 5) for p in prompts]


def test_a_batch_with_little_padding_is_prefilled_padded(llm, monkeypatch):
    """Packing pays where the padding would: prompts of one length fill the rows (2.5% padding here)."""
    generator = LowLatencyGenerator(llm, max_new_tokens=3, max_prompt_tokens=64, batch_size=4)
    packed_calls = []
    original = generator._prefill_packed
    monkeypatch.setattr(generator, "_prefill_packed", lambda *a: packed_calls.append(1) or original(*a))
    even = [prompt(n, seed=30 + i) for i, n in enumerate((40, 40, 40, 36))]
    assert generator.generate_batch(even, 3, eos_token_id=-1) == [reference(llm, p, 3) for p in even]
    assert packed_calls == []
    uneven = [prompt(n, seed=40 + n) for n in (40, 9)]  # 1 - 49 / (4 x 40) of padding
    assert generator.generate_batch(uneven, 3, eos_token_id=-1) == [reference(llm, p, 3) for p in uneven]
    assert packed_calls == [1]


def test_the_prefill_attends_over_its_bucket_only(llm, monkeypatch):
    """A short prompt's prefill sees its bucket's slots as keys, and its decode steps the slots they
    can reach, not the whole cache."""
    from trim import low_latency

    widths: list[int] = []
    update = low_latency.BucketCache.update

    def recording(self, *args, **kwargs):
        keys, values = update(self, *args, **kwargs)
        widths.append(keys.shape[2])
        return keys, values

    monkeypatch.setattr(low_latency.BucketCache, "update", recording)
    generator = LowLatencyGenerator(llm, max_new_tokens=3, max_prompt_tokens=192)
    embeds = prompt(20, seed=4)
    assert generator.generate(embeds, 3, eos_token_id=-1) == reference(llm, embeds, 3)
    layers = llm.config.num_hidden_layers
    assert generator.window(24) == 32 and generator.capacity == 208  # 24 + 3 new + 2 warm-up slots, by 16
    assert widths == [24] * layers + [32] * 2 * layers  # the prefill: its bucket; decoding: the bucket's window


@pytest.mark.parametrize("attn,kv_heads", [("sdpa", 2), ("sdpa", 4), ("eager", 2)])
def test_tokens_equal_transformers_greedy_across_bucket_edges(attn, kv_heads):
    llm = small_llama(attn=attn, kv_heads=kv_heads)
    generator = LowLatencyGenerator(llm, max_new_tokens=12, max_prompt_tokens=192)
    assert not generator.use_graphs and generator.capacity >= 192 + 12
    for n in (1, 31, 32, 33, 64, 65, 150):  # one prompt after another through the same cache
        embeds = prompt(n, seed=n)
        assert generator.generate(embeds, 12, eos_token_id=-1) == reference(llm, embeds, 12), n


def test_stops_at_eos_and_takes_unbatched_embeds(llm):
    embeds = prompt(40, seed=1)
    tokens = reference(llm, embeds, 10)
    eos = tokens[3]
    generator = LowLatencyGenerator(llm, max_new_tokens=10, max_prompt_tokens=64)
    expected = tokens[:tokens.index(eos)]
    assert generator.generate(embeds[0], 10, eos_token_id=eos) == expected
    assert generator.generate(embeds, 2, eos_token_id=-1) == tokens[:2]


def test_works_inside_inference_mode(llm):
    embeds = prompt(20, seed=2)
    generator = LowLatencyGenerator(llm, max_new_tokens=5, max_prompt_tokens=64)
    with torch.inference_mode():
        first = generator.generate(embeds, 5, eos_token_id=-1)
    assert first == generator.generate(embeds, 5, eos_token_id=-1) == reference(llm, embeds, 5)


def test_prefill_and_step_are_the_two_halves(llm):
    embeds = prompt(30, seed=3)
    generator = LowLatencyGenerator(llm, max_new_tokens=4, max_prompt_tokens=64)
    tokens = [generator.prefill(embeds)] + [generator.step() for _ in range(3)]
    assert tokens == reference(llm, embeds, 4)
    with pytest.raises(ValueError, match="4 generated tokens at most"):
        generator.step()


def test_refusals(llm):
    generator = LowLatencyGenerator(llm, max_new_tokens=4, max_prompt_tokens=64)
    with pytest.raises(ValueError, match="do not fit the buckets"):
        generator.prefill(prompt(65, seed=0))
    with pytest.raises(ValueError, match="prefill takes 1 to 1 prompts"):
        generator.prefill_batch([prompt(5, seed=0)] * 2)
    with pytest.raises(ValueError, match="max_new_tokens must be in"):
        generator.generate(prompt(5, seed=0), 5, eos_token_id=-1)
    with pytest.raises(ValueError, match="needs 'sdpa' or 'eager'"):
        llm.config._attn_implementation = "flex_attention"
        try:
            LowLatencyGenerator(llm)
        finally:
            llm.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="CUDA graphs need"):
        LowLatencyGenerator(llm, use_graphs=True)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replays_give_the_eager_tokens_on_cuda(dtype):
    llm = small_llama("cuda", dtype)
    graphs = LowLatencyGenerator(llm, max_new_tokens=12, buckets=(64, 128, 192))
    plain = LowLatencyGenerator(llm, max_new_tokens=12, buckets=(64, 128, 192), use_graphs=False)
    assert graphs.use_graphs
    for n in (7, 64, 100, 150, 7):  # new buckets after the decode graph exists, and back
        embeds = prompt(n, seed=n, device="cuda", dtype=dtype)
        replayed = graphs.generate(embeds, 12, eos_token_id=-1)
        assert replayed == plain.generate(embeds, 12, eos_token_id=-1), n  # same kernels, same shapes
        if dtype == torch.float32:
            assert replayed == reference(llm, embeds, 12), n
    assert sorted(graphs._prefill_graphs) == sorted(graphs._decode_graphs) == [64, 128, 192]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batched_graph_replays_give_the_eager_tokens_on_cuda():
    llm = small_llama("cuda", torch.float32)
    graphs = LowLatencyGenerator(llm, max_new_tokens=6, buckets=(64, 192), batch_size=3)
    plain = LowLatencyGenerator(llm, max_new_tokens=6, buckets=(64, 192), batch_size=3, use_graphs=False)
    assert graphs.packed_prefill
    for lengths in ((7, 64, 30), (150, 9), (5,), (7, 64, 30)):
        prompts = [prompt(n, seed=n, device="cuda") for n in lengths]
        replayed = graphs.generate_batch(prompts, 6, eos_token_id=-1)
        assert replayed == plain.generate_batch(prompts, 6, eos_token_id=-1) == [reference(llm, p, 6) for p in prompts]
    assert sorted(graphs._decode_graphs) == [64, 192] and not graphs._prefill_graphs  # packed prefill: eager
