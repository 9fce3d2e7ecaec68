"""LLaVA's own checkpoint layout (haotian-liu/LLaVA, LLaVA-1.5), read and written without LLaVA's code.

A LLaVA-1.5 checkpoint is a Llama checkpoint with extras: config.json says `model_type: "llava"` and
`architectures: ["LlavaLlamaForCausalLM"]` and adds the `mm_*` keys (vision tower, select layer and
feature, projector type, feature width) and `image_aspect_ratio`; the weights hold the LLM under
Llama's own names and the projector as `model.mm_projector.0.*` and `model.mm_projector.2.*`. The
vision tower is not part of it: LLaVA loads it by the name in `mm_vision_tower`. LLaVA's "llava"
model_type is not transformers' "llava", so config.json is read as JSON and the LLM built from its
Llama fields.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import AutoConfig, PretrainedConfig, PreTrainedModel

from trim.formats.base import (
    VisionSettings,
    copy_side_files,
    load_llm,
    projector_from_llava_keys,
    read_config,
    read_model_dir,
    read_state_dict,
    stored_dtype,
)

logger = logging.getLogger(__name__)

BASE_MODEL = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral"}
"""LLaVA's classes and the transformers model_type of the LLM inside."""
LLAVA_TYPE = {"llama": ("llava", "LlavaLlamaForCausalLM"), "mistral": ("llava_mistral", "LlavaMistralForCausalLM")}
"""An LLM's model_type -> (model_type, architecture) of the LLaVA checkpoint around it."""
LLAVA_ONLY = {"use_mm_proj", "image_aspect_ratio", "image_grid_pinpoints", "tokenizer_padding_side",
              "tokenizer_model_max_length", "tune_mm_mlp_adapter", "freeze_mm_mlp_adapter", "tune_mm_vision_resampler",
              "freeze_mm_vision_resampler", "unfreeze_mm_vision_tower", "freeze_backbone", "s2", "s2_scales",
              "model_type", "architectures", "_name_or_path", "transformers_version"}
"""Config keys that are LLaVA's (or the file's), not the LLM's; the `mm_*` keys too."""


def _base_model_type(config: dict[str, Any]) -> str:
    for architecture in config.get("architectures") or []:
        if architecture in BASE_MODEL:
            return BASE_MODEL[architecture]
    model_type = str(config.get("model_type", ""))
    return model_type.removeprefix("llava_") if model_type.startswith("llava_") else "llama"


def llm_config(config: dict[str, Any]) -> PretrainedConfig:
    """The LLM's own config (e.g. a LlamaConfig) from a LLaVA config.json's fields."""
    fields = {k: v for k, v in config.items() if not k.startswith("mm_") and k not in LLAVA_ONLY}
    return AutoConfig.for_model(_base_model_type(config), **fields)


def vision_settings(config: dict[str, Any]) -> VisionSettings:
    """The vision settings a LLaVA config.json records. A missing `image_aspect_ratio` is LLaVA's
    plain resize and centre-crop ("square")."""
    return VisionSettings(tower=config.get("mm_vision_tower"), layer=config.get("mm_vision_select_layer"),
                          feature_dim=config.get("mm_hidden_size"),
                          aspect_ratio=config.get("image_aspect_ratio") or "square",
                          select_feature=config.get("mm_vision_select_feature", "patch"))


def check_supported(config: dict[str, Any], path: str | Path) -> None:
    """Refuse what LlavaTrim does not model: other projectors, image start/end or patch tokens, tiles."""
    problems = []
    if config.get("mm_projector_type", "linear") != "mlp2x_gelu":
        problems.append(f"mm_projector_type {config.get('mm_projector_type', 'linear')!r} (only mlp2x_gelu)")
    if config.get("mm_use_im_start_end"):
        problems.append("mm_use_im_start_end (image start/end tokens)")
    if config.get("mm_patch_merge_type", "flat") != "flat":
        problems.append(f"mm_patch_merge_type {config['mm_patch_merge_type']!r} (only flat)")
    if problems:
        raise ValueError(f"{path}: not supported: {'; '.join(problems)}")


def load(path: str | Path, dtype: torch.dtype = torch.float32,
         **kwargs: Any) -> tuple[PreTrainedModel, dict[str, torch.Tensor], VisionSettings]:
    """(LLM, projector state in our names, vision settings) of a LLaVA checkpoint. kwargs go to
    from_pretrained (e.g. attn_implementation)."""
    config = read_config(path)
    check_supported(config, path)
    # The weights' LLM names are the LLM's own; the projector (and any vision tower) keys are left over.
    llm = load_llm(path, llm_config(config), dtype, ("model.mm_projector.", "model.vision_tower."), **kwargs)
    projector = projector_from_llava_keys(read_state_dict(path, prefix="model.mm_projector."))
    if not projector:
        raise ValueError(f"{path}: no model.mm_projector.* weights")
    return llm, projector, vision_settings(config)


def rope_fields_for_llava(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level `rope_theta` and `rope_scaling` that LLaVA's transformers (4.37) reads, from the
    `rope_parameters` transformers 5 writes instead: without them LLaVA's code would run at theta 10000
    and unscaled, silently (Mistral-7B-v0.2's theta is 1e6). {} when the config has no rope_parameters."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    kind = rope.get("rope_type", "default")
    if kind not in ("default", "linear", "dynamic"):
        logger.warning("RoPE scaling %r: LLaVA's transformers (4.37) knows only linear and dynamic; its loader "
                       "will refuse this export's rope_scaling", kind)
    scaling = None if kind == "default" else {"type": kind, **{k: v for k, v in rope.items()
                                                              if k not in ("rope_type", "rope_theta")}}
    return {"rope_theta": rope.get("rope_theta", 10000.0), "rope_scaling": scaling}


def _declare_non_legacy(tokenizer_config: Path) -> None:
    """Write `legacy: false` into a Llama tokenizer's config where it says nothing (a model saved before
    LlavaTrim.save recorded it: trim.llm_tokenizer.keep_legacy_setting): transformers 5 tokenizes a
    Llama tokenizer without the key as non-legacy (vicuna's own setting), and LLaVA's slow tokenizer
    would take it as legacy."""
    if not tokenizer_config.exists():
        return
    settings = json.loads(tokenizer_config.read_text())
    if str(settings.get("tokenizer_class", "")).startswith("LlamaTokenizer") and "legacy" not in settings:
        tokenizer_config.write_text(json.dumps({**settings, "legacy": False}, indent=2, sort_keys=True))


def write(model_dir: str | Path, out: str | Path, vision_tower: str | None = None) -> Path:
    """Write a model directory (LlavaTrim.save) in LLaVA's layout: the LLM's weights with the projector
    added as model.mm_projector.*, config.json with LLaVA's keys, tokenizer and generation files.
    vision_tower: recorded as mm_vision_tower (a hub id such as openai/clip-vit-large-patch14-336 or a
    local path); default: the encoder path the model directory records."""
    settings, llm_dir, projector = read_model_dir(model_dir)
    config = read_config(llm_dir)
    if config.get("model_type") not in LLAVA_TYPE:
        raise ValueError(f"LLaVA's code has no class for a {config.get('model_type')!r} LLM (llama, mistral)")
    encoder = settings.get("encoder", {})
    tower = vision_tower or encoder.get("path")
    if not tower:
        raise ValueError(f"{model_dir} records no CLIP path: pass the vision tower's name")
    state = read_state_dict(llm_dir)
    dtype = stored_dtype(state)
    state.update({f"model.mm_projector.{k}": v.to(dtype) for k, v in projector.items()})
    model_type, architecture = LLAVA_TYPE[config["model_type"]]
    config.update(model_type=model_type, architectures=[architecture], mm_vision_tower=str(tower),
                  mm_hidden_size=int(settings["feature_dim"]), mm_vision_select_layer=int(encoder.get("layer", -2)),
                  mm_vision_select_feature="patch", mm_projector_type="mlp2x_gelu", mm_patch_merge_type="flat",
                  mm_use_im_start_end=False, mm_use_im_patch_token=False, image_aspect_ratio="pad", use_mm_proj=True)
    config.update(rope_fields_for_llava(config))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copy_side_files(llm_dir, out)
    _declare_non_legacy(out / "tokenizer_config.json")
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    save_torch_state_dict(state, str(out))
    if "llava" not in out.name.lower():
        # LLaVA's load_pretrained_model treats a checkpoint as multimodal only if its name says llava.
        logger.warning("%s: LLaVA's loader wants 'llava' in the directory name to load the vision tower", out)
    if architecture == "LlavaMistralForCausalLM" and "mistral" not in out.name.lower():
        logger.warning("%s: LLaVA's loader takes its Mistral class only for a directory named with 'mistral'", out)
    if architecture == "LlavaLlamaForCausalLM" and not (out / "tokenizer.model").exists():
        logger.warning("%s has no tokenizer.model: LLaVA's loader asks for the slow Llama tokenizer; copy it "
                       "from the base LLM", out)
    return out
