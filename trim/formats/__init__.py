"""Checkpoint layouts in and out: start from the checkpoints LLaVA users have, export to the ones they serve.

Four layouts are read (`detect_layout`):

- "llava": a LLaVA-1.5 checkpoint as haotian-liu/LLaVA saves it (`LlavaLlamaForCausalLM`, the projector
  inside the weights as `model.mm_projector.{0,2}.*`, `mm_*` config keys); see trim/formats/llava.py;
- "hf-llava": transformers' `LlavaForConditionalGeneration` (vision tower bundled); see trim/formats/hf.py;
- "llm": a plain causal LM, with or without LLaVA's stage-1 `mm_projector.bin` beside it;
- "trim": a model directory this project writes (`LlavaTrim.save`: llm/, mm_projector.bin, trim_llava.json).

Each gives a plain Hugging Face causal LM, the projector's state dict in our key names ("0.weight",
"0.bias", "2.weight", "2.bias") and the vision settings the checkpoint records, which
`check_vision_settings` holds against the TRIM cache's encoder. Exports: `export_model`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from trim.formats import hf, llava
from trim.formats.base import (
    Layout,
    StartingPoint,
    VisionSettings,
    check_vision_settings,
    detect_layout,
    load_llm,
    read_config,
    read_model_dir,
    stage1_projector,
    tokenizer_path,
    trim_vision,
)
from trim.model import LlavaTrim, build_projector
from trim.model_files import SETTINGS_FILE

__all__ = ["Layout", "StartingPoint", "VisionSettings", "check_vision_settings", "detect_layout", "export_model",
           "load_llava_trim", "load_starting_point", "read_vision_settings", "tokenizer_path"]

logger = logging.getLogger(__name__)


def _layout_for(path: str | Path, projector_path: str | Path | None) -> Layout:
    layout = detect_layout(path)
    if projector_path and layout != "llm":
        raise ValueError(f"a projector file ({projector_path}) was given, but {path} is a {layout!r} checkpoint "
                         "with its own projector: leave the projector path empty")
    return layout


def read_vision_settings(path: str | Path, projector_path: str | Path | None = None) -> VisionSettings:
    """The vision settings a checkpoint records, from its config files alone (no LLM weights loaded):
    cheap enough for a driver to check against the cache before workers start."""
    layout = _layout_for(path, projector_path)
    if layout == "llava":
        return llava.vision_settings(read_config(path))
    if layout == "hf-llava":
        return hf.vision_settings(path)
    if layout == "trim":
        return trim_vision(json.loads((Path(path) / SETTINGS_FILE).read_text()))
    projector = stage1_projector(projector_path)
    return VisionSettings(feature_dim=int(projector["0.weight"].shape[1]) if projector else None)


def load_starting_point(path: str | Path, projector_path: str | Path | None = None,
                        dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> StartingPoint:
    """The LLM, projector and vision settings of a checkpoint in any layout. projector_path (LLaVA's
    stage-1 mm_projector.bin) only goes with a plain LLM: the other layouts carry their own."""
    layout = _layout_for(path, projector_path)
    extra: dict[str, Any] = {"attn_implementation": attn_implementation} if attn_implementation else {}
    if layout == "llava":
        llm, projector, vision = llava.load(path, dtype, **extra)
        return StartingPoint(layout, llm, projector, vision, str(path))
    if layout == "hf-llava":
        llm, projector, vision = hf.load(path, dtype, **extra)
        return StartingPoint(layout, llm, projector, vision, str(path))
    if layout == "trim":
        settings, llm_dir, projector = read_model_dir(path)
        llm = load_llm(llm_dir, None, dtype, **extra)
        return StartingPoint(layout, llm, projector, trim_vision(settings), str(llm_dir))
    llm = load_llm(path, None, dtype, **extra)
    projector = stage1_projector(projector_path)
    width = int(projector["0.weight"].shape[1]) if projector else None
    return StartingPoint(layout, llm, projector, VisionSettings(feature_dim=width), str(path))


def load_llava_trim(path: str | Path, feature_dim: int, projector_path: str | Path | None = None,
                    dtype: torch.dtype = torch.float32, settings: dict | None = None,
                    attn_implementation: str | None = None, gradient_checkpointing: bool = False) -> LlavaTrim:
    """A new model from a checkpoint in any layout: its LLM and projector (a plain LLM's from LLaVA's
    stage-1 `projector_path`), a fresh projector where it has none. attn_implementation: None
    (transformers' default), "sdpa", "sdpa_packed" (trim/attention.py), "eager", "flash_attention_2" or
    "flex_attention"; gradient_checkpointing: recompute each decoder layer in the backward pass."""
    start = load_starting_point(path, projector_path, dtype, attn_implementation)
    projector = build_projector(feature_dim, start.llm.config.hidden_size).to(dtype)
    if start.projector:
        width = int(start.projector["0.weight"].shape[1])
        if width != feature_dim:
            raise ValueError(f"the projector of {path} takes {width}-wide features, the cache holds {feature_dim}")
        projector.load_state_dict(start.projector)
    logger.info("starting from %s (%s layout, %s projector)", path, start.layout,
                "its" if start.projector else "a fresh")
    recorded = {"feature_dim": feature_dim, "start": {"path": str(path), "layout": start.layout}, **(settings or {})}
    model = LlavaTrim(start.llm, projector, recorded)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def export_model(model_dir: str | Path, out: str | Path, fmt: str, clip: str | None = None) -> Path:
    """Write a model directory (LlavaTrim.save) in LLaVA's layout ("llava") or transformers' ("hf").
    clip: the CLIP checkpoint (hf: bundled; llava: recorded as mm_vision_tower); default: the
    encoder path recorded in the model directory. The export is written beside `out` and replaces it
    only once complete (trim.staging): a failure leaves what was at `out` as it was."""
    from trim.staging import staged_dir

    if fmt not in ("llava", "hf"):
        raise ValueError(f"unknown export format {fmt!r}: llava or hf")
    with staged_dir(out) as staged:
        if fmt == "llava":
            llava.write(model_dir, staged, vision_tower=clip)
        else:
            hf.write(model_dir, staged, clip_path=clip)
    logger.info("%s export of %s written to %s", fmt, model_dir, out)
    return Path(out)
