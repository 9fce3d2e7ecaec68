"""LlavaTrim: splicing variable visual token counts, text-only rows, freezing, save/load."""

import pytest
import torch

from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trim.model import PROJECTOR_FILE, LlavaTrim, build_projector, pad_batch


@pytest.fixture(scope="module")
def model(tiny_models):
    torch.manual_seed(0)
    return LlavaTrim.from_llm(tiny_models.llm, feature_dim=64, settings={"trim": {"similarity": "dot"}})


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
    model = LlavaTrim.from_llm(tiny_models.llm, feature_dim=64, projector_path=tmp_path / "mm_projector.bin")
    torch.testing.assert_close(model.projector[2].weight, source[2].weight)
