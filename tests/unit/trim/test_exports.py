"""Exports of a model directory to LLaVA's layout and to transformers' LlavaForConditionalGeneration."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

from trim import TrimConfig, trim_tokens
from trim.batching import pad_batch
from trim.conversation import IMAGE_TOKEN_INDEX, conversation_prompt, generation_prompt, tokenize_prompt
from trim.encoders import ClipEncoder, describe_checkpoint
from trim.formats import check_vision_settings, detect_layout, export_model, load_llava_trim, load_starting_point
from trim.model import LlavaTrim

QUESTION = "What is the colour of the circle?"


@pytest.fixture(scope="module")
def encoder(tiny_models):
    return ClipEncoder(tiny_models.clip, layer=-2)


@pytest.fixture(scope="module")
def model_dir(tiny_models, tmp_path_factory):
    torch.manual_seed(0)
    settings = {"trim": TrimConfig(selection="all").to_dict(), "encoder": describe_checkpoint(tiny_models.clip, -2)}
    model = load_llava_trim(tiny_models.llm, feature_dim=64, settings=settings)
    with torch.no_grad():  # a projector far from zero, so a wrong one shows in the logits
        for p in model.projector.parameters():
            p.normal_(0, 0.5)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_models.llm))
    return model.save(tmp_path_factory.mktemp("model"), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def ours(model_dir):
    return LlavaTrim.load(model_dir)


@pytest.fixture(scope="module")
def hf_dir(model_dir, tmp_path_factory):
    return export_model(model_dir, tmp_path_factory.mktemp("out") / "llava-tiny-hf", "hf")


def image() -> Image.Image:
    noise = torch.rand(180, 300, 3, generator=torch.Generator().manual_seed(0)) * 255
    picture = Image.fromarray(noise.to(torch.uint8).numpy())
    picture.paste((220, 30, 30), (100, 50, 160, 110))
    return picture


def our_logits(model: LlavaTrim, encoder: ClipEncoder, ids: list[int], pixels: torch.Tensor) -> torch.Tensor:
    """The project's model on all 576 patch features (layer -2, CLS dropped), as precompute gives them
    with TrimConfig(selection="all")."""
    features = encoder.encode_pixels(pixels)
    text = encoder.encode_texts([QUESTION])
    tokens = trim_tokens(features.features, features.patch_embeds, text, TrimConfig(selection="all")).tokens[0]
    assert tokens.shape == (576, 64)
    spliced = model.embed(pad_batch([{"input_ids": ids, "visual": tokens}], pad_token_id=0))
    with torch.no_grad():
        return model.llm(inputs_embeds=spliced.embeds, attention_mask=spliced.attention_mask).logits


def test_hf_export_gives_the_projects_logits_on_all_576_tokens(hf_dir, ours, encoder):
    model, tokenizer = ours
    hf = LlavaForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    pixels = encoder.preprocess([image()])
    ids = tokenize_prompt(generation_prompt(QUESTION, with_image=True), tokenizer)
    image_id = hf.config.image_token_id
    expanded = [t for i in ids for t in ([image_id] * 576 if i == IMAGE_TOKEN_INDEX else [i])]
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits
    vocab = model.llm.config.vocab_size
    assert theirs.shape[:2] == (1, len(ids) - 1 + 576) and theirs.shape[-1] >= vocab + 1
    torch.testing.assert_close(theirs[..., :vocab], our_logits(model, encoder, ids, pixels), rtol=1e-5, atol=1e-5)


def test_hf_export_processor_pads_like_llava_and_expands_the_image_token(hf_dir, ours, encoder):
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    prompt = generation_prompt(QUESTION, with_image=True)
    inputs = processor(images=[image()], text=[prompt], return_tensors="pt")
    torch.testing.assert_close(inputs["pixel_values"], encoder.preprocess([image()]), rtol=0, atol=1e-6)
    ids = tokenize_prompt(prompt, ours[1])
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    expanded = [t for i in ids for t in ([image_id] * 576 if i == IMAGE_TOKEN_INDEX else [i])]
    got = inputs["input_ids"][0].tolist()
    assert got == expanded or [ids[0], *got] == expanded  # the tiny tokenizer adds no BOS by itself


def test_hf_export_chat_template_is_vicuna_v1(hf_dir):
    processor = AutoProcessor.from_pretrained(str(hf_dir))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == generation_prompt(QUESTION, True)
    turns = [*messages, {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]
    conversation = [{"from": "human", "value": "<image>\n" + QUESTION}, {"from": "gpt", "value": "Red."}]
    assert processor.apply_chat_template(turns) == conversation_prompt(conversation)


def test_hf_export_reads_back_as_a_starting_point(hf_dir, ours, model_dir):
    model, _ = ours
    start = load_starting_point(hf_dir)
    assert detect_layout(hf_dir) == "hf-llava" and start.layout == "hf-llava"
    ids = torch.tensor([[1, 7, 99, 5, 300]])
    with torch.no_grad():
        vocab = model.llm.config.vocab_size
        torch.testing.assert_close(start.llm(input_ids=ids).logits[..., :vocab], model.llm(input_ids=ids).logits)
    for key, value in model.projector.state_dict().items():
        torch.testing.assert_close(start.projector[key], value, rtol=0, atol=0)
    assert (start.vision.layer, start.vision.feature_dim, start.vision.aspect_ratio) == (-2, 64, "pad")
    check_vision_settings(start.vision, json.loads((model_dir / "trim_llava.json").read_text())["encoder"])


def test_llava_export_is_llavas_layout_and_reads_back(model_dir, ours, tmp_path, tiny_models):
    model, _ = ours
    out = export_model(model_dir, tmp_path / "llava-v1.5-tiny-trim", "llava")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaLlamaForCausalLM"] and config["model_type"] == "llava"
    assert (config["mm_projector_type"], config["mm_hidden_size"], config["mm_vision_select_layer"]) == (
        "mlp2x_gelu", 64, -2)
    assert (config["image_aspect_ratio"], config["mm_vision_tower"]) == ("pad", str(tiny_models.clip))
    # RoPE where LLaVA's transformers (4.37) reads it, beside transformers 5's rope_parameters
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] and config["rope_scaling"] is None
    assert (out / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == ours[1].get_vocab()  # training reads it there
    start = load_starting_point(out)
    assert start.layout == "llava"
    ids = torch.tensor([[1, 7, 99, 5, 300]])
    with torch.no_grad():
        torch.testing.assert_close(start.llm(input_ids=ids).logits, model.llm(input_ids=ids).logits, rtol=0, atol=0)
    for key, value in model.projector.state_dict().items():
        torch.testing.assert_close(start.projector[key], value, rtol=0, atol=0)
    check_vision_settings(start.vision, describe_checkpoint(tiny_models.clip, -2))


def test_rope_settings_are_written_where_llavas_transformers_reads_them():
    from trim.formats.llava import rope_fields_for_llava

    assert rope_fields_for_llava({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}) == {
        "rope_theta": 1e6, "rope_scaling": None}
    assert rope_fields_for_llava({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}) == {
        "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}}
    assert rope_fields_for_llava({"rope_theta": 1e4}) == {}


def test_a_llama_tokenizer_exported_for_llava_says_it_is_not_legacy(tmp_path):
    from trim.formats.llava import _declare_non_legacy

    llama, other, kept = tmp_path / "llama.json", tmp_path / "other.json", tmp_path / "kept.json"
    llama.write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    other.write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    kept.write_text(json.dumps({"tokenizer_class": "LlamaTokenizerFast", "legacy": True}))
    for path in (llama, other, kept):
        _declare_non_legacy(path)
    assert json.loads(llama.read_text())["legacy"] is False and "legacy" not in json.loads(other.read_text())
    assert json.loads(kept.read_text())["legacy"] is True  # a setting the LLM states is kept


def test_llava_export_records_a_given_tower_name(model_dir, tmp_path):
    out = export_model(model_dir, tmp_path / "llava-named", "llava", clip="openai/clip-vit-large-patch14-336")
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"] == "openai/clip-vit-large-patch14-336"
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(model_dir, tmp_path / "x", "gguf")


def test_export_job_writes_and_refuses_to_overwrite(model_dir, tmp_path):
    from jobs import export

    out = tmp_path / "llava-job"
    written = export.main(["--model", str(model_dir), "--format", "llava", "--out", str(out)])
    assert written == out and detect_layout(out) == "llava"
    with pytest.raises(SystemExit, match="--overwrite"):
        export.main(["--model", str(model_dir), "--format", "hf", "--out", str(out)])
    export.main(["--model", str(model_dir), "--format", "hf", "--out", str(out), "--overwrite"])
    assert detect_layout(out) == "hf-llava" and not (out / "pytorch_model.bin").exists()
