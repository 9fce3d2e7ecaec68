"""The "sdpa_packed" attention (trim/attention.py): the same outputs as transformers' sdpa, packed rows
cut per sample, everything else passed through."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from trim import attention
from trim.attention import NAME, sample_spans


def _pair(config_cls=LlamaConfig, model_cls=LlamaForCausalLM, **extra):
    """The same random model with transformers' sdpa and with sdpa_packed."""
    torch.manual_seed(0)
    config = config_cls(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)
    reference = model_cls._from_config(config, attn_implementation="sdpa").eval()
    packed = model_cls._from_config(config, attn_implementation=NAME).eval()
    packed.load_state_dict(reference.state_dict())
    assert packed.config._attn_implementation == NAME
    return reference, packed


def test_sample_spans_cut_where_positions_stop_counting_up():
    positions = torch.tensor([[0, 1, 2, 0, 1, 5, 6, 7], [3, 4, 5, 6, 7, 8, 9, 10]])
    assert sample_spans(positions, 2) == [[(0, 3), (3, 5), (5, 8)], [(0, 8)]]
    assert sample_spans(positions[:1], 3) == [[(0, 3), (3, 5), (5, 8)]] * 3  # one row of positions for all rows


def test_spans_are_cut_once_per_position_tensor_and_again_when_it_changes():
    positions = torch.tensor([[0, 1, 2, 0, 1]])
    first = attention._spans_of(positions, 1)
    assert attention._spans_of(positions, 1) is first  # the next layer reuses the cut
    positions[0, 2] = 0  # changed in place: cut again
    assert attention._spans_of(positions, 1) == [[(0, 2), (2, 3), (3, 5)]]
    assert attention._spans_of(torch.tensor([[0, 1, 2, 0, 1]]), 1) == first  # another tensor, same values


def _packed_rows():
    """Two rows of samples laid end to end, their positions restarting; the second row ends in padding
    whose positions restart too (as trim.model lays packed rows out)."""
    lengths = [[5, 9, 2, 8], [11, 7, 6]]
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lengths])
    ids = torch.randint(1, 50, positions.shape, generator=torch.Generator().manual_seed(3))
    return ids, positions, lengths


def test_packed_rows_match_each_sample_run_alone_and_sdpa(monkeypatch):
    reference, packed = _pair()
    ids, positions, lengths = _packed_rows()
    calls = []

    def spy(module, query, *args, **kwargs):
        calls.append(query.shape[2])
        return sdpa_attention_forward(module, query, *args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    out = packed(input_ids=ids, position_ids=positions).logits
    monkeypatch.undo()
    assert calls == [n for row in lengths for n in row] * 2  # one call per sample in each of the 2 layers
    torch.testing.assert_close(out, reference(input_ids=ids, position_ids=positions).logits, rtol=1e-5, atol=1e-5)
    for r, row in enumerate(lengths):
        start = 0
        for n in row:  # each sample alone, no packing: the same logits
            alone = reference(input_ids=ids[r:r + 1, start:start + n]).logits[0]
            torch.testing.assert_close(out[r, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n


def test_packed_gradients_match_sdpa():
    reference, packed = _pair()
    reference.train()
    packed.train()
    ids, positions, _ = _packed_rows()
    grads = []
    for model in (reference, packed):
        model(input_ids=ids, position_ids=positions, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_padded_batches_and_cached_generation_are_sdpa_unchanged():
    reference, packed = _pair()
    ids = torch.randint(1, 50, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as generation batches are
    torch.testing.assert_close(packed(input_ids=ids, attention_mask=mask).logits,
                               reference(input_ids=ids, attention_mask=mask).logits)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(packed.generate(ids, **kwargs), reference.generate(ids, **kwargs))
    single = ids[:1]
    assert torch.equal(packed.generate(single, max_new_tokens=6, do_sample=False, pad_token_id=0),
                       reference.generate(single, max_new_tokens=6, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("window", [4, None])
def test_sliding_window_models_keep_their_mask(window):
    reference, packed = _pair(MistralConfig, MistralForCausalLM, sliding_window=window)
    ids, positions, _ = _packed_rows()
    torch.testing.assert_close(packed(input_ids=ids, position_ids=positions).logits,
                               reference(input_ids=ids, position_ids=positions).logits, rtol=1e-5, atol=1e-5)
