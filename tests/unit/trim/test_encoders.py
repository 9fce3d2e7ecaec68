"""CLIP encoders on the tiny checkpoint: shapes, LLaVA's pad-to-square, text truncation, loading."""

import json

import pytest
import torch
from PIL import Image

from synthetic.tiny_models import build_tiny_models
from trim.encoders import ClipEncoder, expand_to_square, pad_colour


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return ClipEncoder(tiny_models.clip)


def test_expand_to_square_centres_on_the_background():
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    square = expand_to_square(image, (1, 2, 3))
    assert square.size == (40, 40)
    assert square.getpixel((0, 0)) == (1, 2, 3)  # padding above
    assert square.getpixel((0, 39)) == (1, 2, 3)  # padding below
    assert square.getpixel((20, 20)) == (255, 0, 0)  # the image, centred
    assert square.getpixel((20, 10)) == (255, 0, 0) and square.getpixel((20, 9)) == (1, 2, 3)
    tall = expand_to_square(Image.new("L", (5, 9), 200), (0, 0, 0))
    assert tall.size == (9, 9) and tall.mode == "RGB" and tall.getpixel((1, 4)) == (0, 0, 0)


def test_pad_colour_truncates_like_llava():
    # LLaVA: tuple(int(x * 255) for x in image_mean); rounding would give (123, 117, 104).
    assert pad_colour([0.48145466, 0.4578275, 0.40821073]) == (122, 116, 104)
    assert pad_colour([0.999, 0.0, 0.5]) == (254, 0, 127)


def test_background_is_llavas_pad_colour_of_the_processor_mean(encoder):
    assert list(encoder.processor.image_mean) == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    assert encoder.background == (122, 116, 104)
    assert encoder.describe()["pad_colour"] == [122, 116, 104]


def test_padding_pixels_have_the_pad_colour(encoder):
    # A wide image: the rows above it are (122, 116, 104) exactly, before the CLIP processor.
    square = expand_to_square(Image.new("RGB", (30, 10), (0, 0, 0)), encoder.background)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((15, 15)) == (0, 0, 0)


@pytest.mark.parametrize("size", [(336, 336), (500, 120), (90, 700), (17, 13)])
def test_image_features_have_576_patches_at_any_aspect_ratio(encoder, size):
    image = Image.effect_noise(size, 40).convert("RGB")
    pixels = encoder.preprocess([image])
    assert pixels.shape == (1, 3, 336, 336)
    out = encoder.encode_images([image, image])
    assert out.features.shape == (2, 576, encoder.feature_dim)
    assert out.patch_embeds.shape == (2, 576, encoder.model.config.projection_dim)
    torch.testing.assert_close(out.features[0], out.features[1])


def test_odd_aspect_ratio_is_padded_not_stretched(encoder):
    # A wide strip padded to square: the top rows of the processed image are the mean colour,
    # which normalises to ~0 in every channel.
    strip = Image.new("RGB", (600, 60), (255, 255, 255))
    pixels = encoder.preprocess([strip])[0]
    assert pixels[:, :50, :].abs().max() < 0.02
    assert pixels[:, 168, :].min() > 1.5  # the white strip through the middle


def test_features_come_from_the_chosen_layer(tiny_models):
    image = Image.effect_noise((64, 64), 40).convert("RGB")
    penultimate = ClipEncoder(tiny_models.clip, layer=-2)
    last = ClipEncoder(tiny_models.clip, layer=-1)
    pixels = penultimate.preprocess([image])
    hidden = penultimate.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(penultimate.encode_pixels(pixels).features, hidden[-2][:, 1:])
    torch.testing.assert_close(last.encode_pixels(pixels).features, hidden[-1][:, 1:])


def test_text_embeddings_are_truncated_to_77_tokens(encoder):
    long_text = "what is the colour of the car on the left " * 40
    assert len(encoder.tokenizer(long_text)["input_ids"]) > 77
    embeds = encoder.encode_texts([long_text, "a dog"])
    assert embeds.shape == (2, encoder.model.config.projection_dim)
    # Everything after the 77th token is cut: changing the tail does not change the embedding.
    altered = encoder.encode_texts([long_text + " purple elephants riding bikes"])
    torch.testing.assert_close(altered[0], embeds[0])


def test_describe_records_what_a_manifest_needs(encoder):
    info = encoder.describe()
    assert info["num_patches"] == 576 and info["layer"] == -2 and len(info["config_hash"]) == 16
    json.dumps(info)


def test_tiny_models_build_is_idempotent(tiny_models):
    before = {p: p.stat().st_mtime_ns for p in tiny_models.clip.iterdir()}
    again = build_tiny_models(tiny_models.clip.parent)
    assert again == tiny_models
    assert {p: p.stat().st_mtime_ns for p in tiny_models.clip.iterdir()} == before


def test_tiny_llm_loads_through_from_pretrained(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models.llm)
    tokenizer = AutoTokenizer.from_pretrained(tiny_models.llm)
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token == "</s>" and tokenizer.bos_token == "<s>"
    ids = tokenizer("USER: what is the colour ASSISTANT:", add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == "USER: what is the colour ASSISTANT:"
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tokenizer))


def test_pixel_values_are_the_clip_processors_bit_for_bit(encoder):
    # 8-bit pixels on the host, rescaled and normalized on the device by table lookup: the same values
    # as the processor's float64 rescale and float32 normalize.
    images = [Image.effect_noise(size, 50).convert("RGB") for size in ((500, 120), (90, 700), (336, 336))]
    squared = [expand_to_square(image, encoder.background) for image in images]
    expected = encoder.processor(images=squared, return_tensors="pt")["pixel_values"]
    levels = encoder.host.prepare(images)
    assert levels.dtype == torch.uint8 and levels.shape == (3, 3, 336, 336)
    assert torch.equal(encoder.preprocess(images), expected)
    assert torch.equal(encoder.towers.normalize(levels), expected)


def test_the_processor_path_is_taken_when_resize_and_crop_differ(tiny_models):
    # A processor whose crop is smaller than its resize: the fast path does not apply.
    from trim.encoders import ClipHost

    host = ClipHost(tiny_models.clip)
    host.processor.size = {"shortest_edge": 340}
    host._side = None
    image = Image.effect_noise((64, 40), 50).convert("RGB")
    squared = expand_to_square(image, host.background)
    expected = host.processor(images=[squared], do_rescale=False, do_normalize=False, return_tensors="np")
    assert torch.equal(host.prepare([image]), torch.from_numpy(expected["pixel_values"]))


def test_the_vision_tower_runs_only_to_the_selected_layer_with_the_same_result(tiny_models):
    encoder = ClipEncoder(tiny_models.clip)
    pixels = encoder.preprocess([Image.effect_noise((64, 64), 40).convert("RGB")])
    hidden = encoder.model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
    calls = []
    last = encoder.model.vision_model.encoder.layers[-1]
    handle = last.register_forward_hook(lambda *args: calls.append(1))
    try:
        features = encoder.encode_pixels(pixels).features
    finally:
        handle.remove()
    assert calls == []  # layer -2 never runs the last layer
    assert torch.equal(features, hidden[-2][:, 1:])


def test_texts_tokenized_apart_give_the_same_embeddings(encoder):
    texts = ["a red circle", "what is the colour of the car on the left " * 20]
    ids, mask = encoder.host.tokenize(texts)
    assert ids.shape[1] <= 77
    assert torch.equal(encoder.towers.encode_tokens(ids, mask), encoder.encode_texts(texts))


def test_the_zero_image_is_llavas_dummy_pixels(encoder):
    zero = encoder.towers.zero_image()
    expected = encoder.encode_pixels(torch.zeros(1, 3, 336, 336))
    assert torch.equal(zero.features, expected.features) and zero.features.shape == (1, 576, encoder.feature_dim)
