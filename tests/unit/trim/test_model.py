"""LlavaTrim: splicing variable visual token counts, text-only rows, packing, devices, freezing, save/load."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from trim.batching import pack_batch, pad_batch, spliced_length
from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trim.formats import load_llava_trim
from trim.model import PROJECTOR_FILE, LlavaTrim, build_projector


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    return load_llava_trim(tiny_models.llm, feature_dim=64, settings={"trim": {"similarity": "dot"}})


def _samples():
    return [
        {"input_ids": [1, 5, IMAGE_TOKEN_INDEX, 6, 7], "labels": [IGNORE_INDEX] * 3 + [6, 7], "visual": torch.randn(3, 64)},
        {"input_ids": [1, 8, 9], "labels": [IGNORE_INDEX, 8, 9], "visual": torch.zeros(0, 64)},  # text-only
        {"input_ids": [1, IMAGE_TOKEN_INDEX, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 4], "visual": torch.randn(7, 64)},
    ]


def test_projector_is_mlp2x_gelu():
    projector = build_projector(1024, 4096)
    assert [type(m).__name__ for m in projector] == ["Linear", "GELU", "Linear"]
    assert (projector[0].in_features, projector[0].out_features, projector[2].out_features) == (1024, 4096, 4096)


def test_splice_puts_each_samples_visual_tokens_at_its_placeholder(model):
    batch = pad_batch(_samples(), pad_token_id=3)
    embeds, mask, labels = model.splice(batch)
    lengths = [5 - 1 + 3, 3, 3 - 1 + 7]
    assert embeds.shape[:2] == (3, max(lengths))
    assert mask.sum(dim=1).tolist() == lengths
    text = model.llm.get_input_embeddings()
    torch.testing.assert_close(embeds[0, 2:5], model.projector(batch.visual[0]))
    torch.testing.assert_close(embeds[0, 5], text(torch.tensor(6)))
    torch.testing.assert_close(embeds[1, :3], text(torch.tensor([1, 8, 9])))
    torch.testing.assert_close(embeds[2, 1:8], model.projector(batch.visual[2]))
    assert labels[0].tolist()[:7] == [IGNORE_INDEX] * 5 + [6, 7]
    assert labels[2].tolist() == [IGNORE_INDEX] * 8 + [4]
    assert (labels[1, 3:] == IGNORE_INDEX).all() and (embeds[1, 3:] == 0).all()


def test_padding_does_not_change_a_samples_loss(model):
    samples = _samples()
    alone = model(pad_batch(samples[:1], pad_token_id=3))
    # A longer neighbour (9 positions after splicing, vs 7) with no labels pads sample 0: the loss
    # over sample 0's own tokens must stay the same.
    with_long = model(pad_batch([samples[0], {**samples[2], "labels": [IGNORE_INDEX] * 3}], pad_token_id=3))
    torch.testing.assert_close(alone, with_long, rtol=1e-4, atol=1e-5)


def test_freezing_options(model):
    model.set_trainable(train_llm=False)
    assert all(p.requires_grad for p in model.projector.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    model.set_trainable(train_llm=True)
    assert all(p.requires_grad for p in model.parameters())


def test_loss_backpropagates_to_the_projector(model):
    model.zero_grad()
    model(pad_batch(_samples(), pad_token_id=3)).backward()
    assert model.projector[0].weight.grad.abs().sum() > 0


def test_save_and_load_round_trip(model, tmp_path, tiny_models):
    from transformers import AutoTokenizer

    model.save(tmp_path / "m", tokenizer=AutoTokenizer.from_pretrained(tiny_models.llm))
    assert (tmp_path / "m" / PROJECTOR_FILE).exists()
    loaded, tokenizer = LlavaTrim.load(tmp_path / "m")
    assert loaded.settings["trim"] == {"similarity": "dot"} and loaded.settings["feature_dim"] == 64
    batch = pad_batch(_samples(), pad_token_id=tokenizer.pad_token_id)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_projector_loads_llava_stage1_weights(tiny_models, tmp_path):
    source = build_projector(64, 64)
    torch.save({f"model.mm_projector.{k}": v for k, v in source.state_dict().items()}, tmp_path / "mm_projector.bin")
    model = load_llava_trim(tiny_models.llm, feature_dim=64, projector_path=tmp_path / "mm_projector.bin")
    torch.testing.assert_close(model.projector[2].weight, source[2].weight)


# Packed micro-batches ---------------------------------------------------------------------------


def _tiny_llava(attn: str, dtype: torch.dtype = torch.float32) -> LlavaTrim:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    llm = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=dtype)
    return LlavaTrim(llm, build_projector(16, 32).to(dtype), {"feature_dim": 16})


def _mixed_samples():
    """Images with various k_i (0 and 1 included), text-only rows, and labels that start supervised
    (a packed row must not train the next sample's first token from the previous sample)."""
    g = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(3, 64, (n,), generator=g).tolist()

    samples = []
    for n, k, image in [(9, 5, True), (4, 0, False), (12, 13, True), (6, 1, True), (15, 0, False), (7, 0, True),
                        (3, 0, False), (10, 22, True)]:
        row = ids(n)
        if image:
            row[1] = IMAGE_TOKEN_INDEX
        labels = [t if (t != IMAGE_TOKEN_INDEX and i >= n // 3) else IGNORE_INDEX for i, t in enumerate(row)]
        if not image:
            labels[0] = row[0]  # a supervised first position
        samples.append({"input_ids": row, "labels": labels, "visual": torch.randn(k, 16, generator=g)})
    return samples


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attn", ["eager", "sdpa", "sdpa_packed"])
@pytest.mark.parametrize("max_length", [None, 40])
def test_packed_batch_gives_the_padded_loss_and_gradients(attn, max_length):
    model = _tiny_llava(attn)
    samples = _mixed_samples()
    packed = pack_batch(samples, max_length=max_length, pad_token_id=0)
    assert packed.input_ids.shape[0] == (1 if max_length is None else 3)
    loss_padded, grads_padded = _loss_and_grads(model, pad_batch(samples, pad_token_id=0))
    loss_packed, grads_packed = _loss_and_grads(model, packed)
    torch.testing.assert_close(loss_packed, loss_padded, rtol=1e-4, atol=1e-6)
    assert grads_packed.keys() == grads_padded.keys()
    assert any(n.startswith("projector.") for n in grads_padded) and any(n.startswith("llm.") for n in grads_padded)
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_pack_batch_rows_hold_whole_samples_within_max_length():
    samples = _mixed_samples()
    lengths = [spliced_length(s) for s in samples]
    assert lengths[:3] == [9 - 1 + 5, 4, 12 - 1 + 13]
    batch = pack_batch(samples, max_length=40, pad_token_id=0)
    model = _tiny_llava("eager")
    spliced = model.embed(batch)
    assert (spliced.attention_mask.sum(dim=1) <= 40).all()
    assert int(spliced.attention_mask.sum()) == sum(lengths)
    # Every sample once, its tokens contiguous, positions restarting at 0 per sample.
    found = []
    for r in range(batch.input_ids.shape[0]):
        n = int(batch.attention_mask[r].sum())
        starts = (batch.position_ids[r, :n] == 0).nonzero().flatten().tolist()
        for start, end in zip(starts, starts[1:] + [n]):
            found.append(batch.input_ids[r, start:end].tolist())
            assert batch.position_ids[r, start:end].tolist() == list(range(end - start))
        real = int(spliced.attention_mask[r].sum())
        first = (spliced.position_ids[r, :real] == 0).nonzero().flatten()
        assert (spliced.labels[r, first] == IGNORE_INDEX).all()
    assert sorted(found) == sorted(s["input_ids"] for s in samples)
    # The visual entries follow the samples' order in the rows.
    order = [next(i for i, s in enumerate(samples) if s["input_ids"] == ids) for ids in found]
    assert all(batch.visual[j] is samples[i]["visual"] for j, i in enumerate(order))


def test_a_sample_longer_than_max_length_gets_its_own_row():
    samples = _mixed_samples()
    batch = pack_batch(samples, max_length=20, pad_token_id=0)
    spliced = _tiny_llava("eager").embed(batch)
    lengths = spliced.attention_mask.sum(dim=1).tolist()
    assert max(lengths) == 10 - 1 + 22 and sum(lengths) == sum(spliced_length(s) for s in samples)
    assert sorted(lengths)[:-2] == [n for n in sorted(lengths)[:-2] if n <= 20]


def test_forward_moves_the_batch_to_the_models_device_and_dtype():
    model = _tiny_llava("sdpa", dtype=torch.bfloat16)
    samples = [{**s, "visual": s["visual"].half()} for s in _mixed_samples()]
    for batch in (pad_batch(samples, pad_token_id=0), pack_batch(samples, max_length=None, pad_token_id=0)):
        moved = model.to_device(batch)
        assert all(v.dtype == torch.bfloat16 for v in moved.visual)
        assert moved.input_ids.device == model.llm.device
        assert model.embed(batch).embeds.dtype == torch.bfloat16
        assert torch.isfinite(model(batch))


def test_generate_refuses_a_packed_batch():
    model = _tiny_llava("eager")
    with pytest.raises(ValueError, match="padded"):
        model.generate(pack_batch(_mixed_samples(), None, 0), max_new_tokens=2, eos_token_id=2, pad_token_id=0)


def test_from_llm_sets_attention_and_gradient_checkpointing(tiny_models, model):
    checkpointed = load_llava_trim(tiny_models.llm, feature_dim=64, attn_implementation="eager",
                                      gradient_checkpointing=True)
    assert checkpointed.llm.config._attn_implementation == "eager"
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.llm.modules())
    checkpointed.projector.load_state_dict(model.projector.state_dict())
    model.train()
    checkpointed.train()
    batch = pack_batch(_samples(), max_length=None, pad_token_id=3)
    loss_plain, grads_plain = _loss_and_grads(model, batch)
    loss_checkpointed, grads_checkpointed = _loss_and_grads(checkpointed, batch)
    torch.testing.assert_close(loss_checkpointed, loss_plain, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads_checkpointed["projector.0.weight"], grads_plain["projector.0.weight"],
                               rtol=1e-4, atol=1e-6)
