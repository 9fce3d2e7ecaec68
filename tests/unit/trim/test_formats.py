"""Starting points in every layout (tiny checkpoints written here, no hub), detection, vision checks."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlamaForCausalLM, LlavaConfig, LlavaForConditionalGeneration

from trim.formats import (
    VisionSettings,
    check_vision_settings,
    detect_layout,
    load_llava_trim,
    load_starting_point,
    read_vision_settings,
    tokenizer_path,
)
from trim.formats.llava import llm_config

IDS = torch.tensor([[1, 5, 9, 42, 7, 3, 11, 60]])
ENCODER = {"path": "/data/models/clip-vit-large-patch14-336", "layer": -2, "feature_dim": 24, "num_patches": 576,
           "image_size": 336, "patch_size": 14,
           "preprocessing": "llava-1.5: pad to square with int(255 * processor mean), then CLIP processor"}


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).eval()


def logits(llm) -> torch.Tensor:
    with torch.no_grad():
        return llm(input_ids=IDS).logits


def random_projector(feature_dim: int, hidden: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return {"0.weight": torch.randn(hidden, feature_dim), "0.bias": torch.randn(hidden),
            "2.weight": torch.randn(hidden, hidden), "2.bias": torch.randn(hidden)}


def llava_config(llm: LlamaForCausalLM, **extra) -> dict:
    """config.json as haotian-liu/LLaVA writes it for LLaVA-1.5 (the released checkpoints' keys)."""
    config = llm.config.to_dict()
    config.update(architectures=["LlavaLlamaForCausalLM"], model_type="llava", torch_dtype="float16",
                  transformers_version="4.31.0", pretraining_tp=1, rope_scaling=None, max_length=4096,
                  freeze_mm_mlp_adapter=False, tune_mm_mlp_adapter=False, image_aspect_ratio="pad",
                  mm_hidden_size=24, mm_projector_type="mlp2x_gelu", mm_use_im_patch_token=False,
                  mm_use_im_start_end=False, mm_vision_select_feature="patch", mm_vision_select_layer=-2,
                  mm_vision_tower="openai/clip-vit-large-patch14-336", use_mm_proj=True, **extra)
    config.pop("dtype", None)
    return config


@pytest.fixture(scope="module")
def llava_checkpoint(tmp_path_factory):
    """A LLaVA-1.5 checkpoint as LLaVA's trainer saves it: Llama weights and the projector in
    sharded pytorch_model-*.bin files with an index."""
    llm = tiny_llama()
    path = tmp_path_factory.mktemp("llava-v1.5-tiny")
    state = {k: v.clone() for k, v in llm.state_dict().items()}
    projector = random_projector(24, 32)
    state.update({f"model.mm_projector.{k}": v for k, v in projector.items()})
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, names in shards.items():
        torch.save({k: state[k] for k in names}, path / name)
    weight_map = {k: name for name, names in shards.items() for k in names}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(llava_config(llm)))
    return path, llm, projector


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """A LlavaForConditionalGeneration checkpoint as transformers saves it."""
    torch.manual_seed(2)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=24, intermediate_size=48,
                              num_hidden_layers=2, num_attention_heads=2)
    config = LlavaConfig(vision_config=vision, text_config=tiny_llama().config, image_token_index=95,
                         vision_feature_layer=-2)
    model = LlavaForConditionalGeneration(config).eval()
    path = tmp_path_factory.mktemp("hf-llava")
    model.save_pretrained(path)
    return path, model


def test_layouts_are_detected(tiny_models, llava_checkpoint, hf_checkpoint, tmp_path):
    assert detect_layout(tiny_models.llm) == "llm"
    assert detect_layout(llava_checkpoint[0]) == "llava"
    assert detect_layout(hf_checkpoint[0]) == "hf-llava"
    saved = load_llava_trim(tiny_models.llm, feature_dim=64).save(tmp_path / "model")
    assert detect_layout(saved) == "trim" and tokenizer_path(saved) == str(saved / "llm")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        detect_layout(tmp_path)


def test_llava_checkpoint_gives_the_llm_projector_and_vision_settings(llava_checkpoint):
    path, llm, projector = llava_checkpoint
    start = load_starting_point(path)
    assert start.layout == "llava" and type(start.llm).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(start.llm), logits(llm), rtol=0, atol=0)
    assert sorted(start.projector) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    for key, value in projector.items():
        torch.testing.assert_close(start.projector[key], value, rtol=0, atol=0)
    assert start.vision == VisionSettings(tower="openai/clip-vit-large-patch14-336", layer=-2, feature_dim=24,
                                          aspect_ratio="pad", select_feature="patch")
    assert read_vision_settings(path) == start.vision


def test_llava_config_becomes_the_llms_own():
    config = llm_config(llava_config(tiny_llama()))
    assert type(config).__name__ == "LlamaConfig" and config.hidden_size == 32 and config.vocab_size == 96
    assert not any(k.startswith("mm_") for k in config.to_dict())


def test_hf_llava_checkpoint_gives_the_llm_projector_and_vision_settings(hf_checkpoint):
    path, model = hf_checkpoint
    start = load_starting_point(path)
    assert start.layout == "hf-llava" and type(start.llm).__name__ == "LlamaForCausalLM"
    reference = tiny_llama()
    reference.model.load_state_dict(model.model.language_model.state_dict())
    reference.lm_head.load_state_dict(model.lm_head.state_dict())
    torch.testing.assert_close(logits(start.llm), logits(reference), rtol=0, atol=0)
    projector = model.model.multi_modal_projector
    torch.testing.assert_close(start.projector["0.weight"], projector.linear_1.weight, rtol=0, atol=0)
    torch.testing.assert_close(start.projector["2.bias"], projector.linear_2.bias, rtol=0, atol=0)
    assert (start.vision.layer, start.vision.feature_dim, start.vision.select_feature) == (-2, 24, "patch")
    assert start.vision.tower_bundled and (start.vision.image_size, start.vision.patch_size) == (336, 14)


def test_llm_with_stage1_projector(tiny_models, tmp_path):
    projector = random_projector(64, 64)
    torch.save({f"model.mm_projector.{k}": v for k, v in projector.items()}, tmp_path / "mm_projector.bin")
    start = load_starting_point(tiny_models.llm, tmp_path / "mm_projector.bin")
    assert start.layout == "llm" and start.vision.feature_dim == 64 and start.vision.layer is None
    torch.testing.assert_close(start.projector["2.weight"], projector["2.weight"], rtol=0, atol=0)
    assert load_starting_point(tiny_models.llm).projector == {}


def test_load_llava_trim_builds_the_model_from_any_layout(llava_checkpoint, tiny_models, tmp_path):
    path, llm, projector = llava_checkpoint
    model = load_llava_trim(path, feature_dim=24, settings={"trim": {}})
    torch.testing.assert_close(model.projector[0].weight, projector["0.weight"], rtol=0, atol=0)
    assert model.settings["start"] == {"path": str(path), "layout": "llava"} and model.settings["feature_dim"] == 24
    with pytest.raises(ValueError, match="takes 24-wide features, the cache holds 64"):
        load_llava_trim(path, feature_dim=64)
    with pytest.raises(ValueError, match="its own projector"):
        load_llava_trim(path, feature_dim=24, projector_path=tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match="its own projector"):  # the driver's check refuses it up front
        read_vision_settings(path, tmp_path / "mm_projector.bin")
    fresh = load_llava_trim(tiny_models.llm, feature_dim=64)
    assert fresh.settings["start"]["layout"] == "llm" and fresh.projector[0].in_features == 64


def test_unsupported_llava_variants_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llava_config(tiny_llama()) | {"mm_use_im_start_end": True}))
    with pytest.raises(ValueError, match="mm_use_im_start_end"):
        load_starting_point(tmp_path)


def test_llava_checkpoint_missing_llm_weights_is_refused(tmp_path):
    llm = tiny_llama()
    state = {k: v for k, v in llm.state_dict().items() if not k.startswith("model.layers.1.")}
    torch.save({**state, "model.mm_projector.0.weight": torch.zeros(32, 24)}, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(llava_config(llm)))
    with pytest.raises(ValueError, match="lack .*model.layers.1."):
        load_starting_point(tmp_path)


def test_matching_vision_settings_pass():
    # LLaVA records the hub id; the cache was made from a local copy with the same name.
    check_vision_settings(VisionSettings(tower="openai/clip-vit-large-patch14-336", layer=-2, feature_dim=24,
                                         aspect_ratio="pad"), ENCODER)
    check_vision_settings(VisionSettings(), ENCODER)  # nothing recorded: nothing to refuse
    check_vision_settings(VisionSettings(tower="/x/hf", layer=-2, feature_dim=24, tower_bundled=True,
                                         image_size=336, patch_size=14), ENCODER)


@pytest.mark.parametrize("settings, named", [
    (VisionSettings(layer=-1), "vision layer: the checkpoint has -1, the cache's encoder has -2"),
    (VisionSettings(feature_dim=1024), "feature dim: the checkpoint has 1024, the cache's encoder has 24"),
    (VisionSettings(tower="openai/clip-vit-base-patch16"),
     "vision tower: the checkpoint has 'openai/clip-vit-base-patch16', the cache's encoder has "
     "'/data/models/clip-vit-large-patch14-336'"),
    (VisionSettings(aspect_ratio="square"), "aspect-ratio handling: the checkpoint has 'square'"),
    (VisionSettings(select_feature="cls_patch"), "selected features: the checkpoint has 'cls_patch'"),
    (VisionSettings(tower_bundled=True, tower="x", image_size=224), "image size: the checkpoint has 224"),
])
def test_vision_mismatches_are_refused_naming_both_values(settings, named):
    with pytest.raises(ValueError, match="do not match") as error:
        check_vision_settings(settings, ENCODER)
    assert named in str(error.value)
