"""transformers' `LlavaForConditionalGeneration` layout, read and written.

Written under the names llava-hf's checkpoints use (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.linear_{1,2}.*`), which transformers maps onto its
modules when loading and serving engines read. The export bundles the CLIP vision tower, a
`LlavaProcessor` whose image processor pads to square with `int(255 * mean)` as LLaVA's `expand2square`
(`LlavaImageProcessor(Pil)` with `do_pad`), the tokenizer with an `<image>` token, and LLaVA's vicuna_v1
prompt as the chat template. Such a model sees all 576 patch tokens per image: TRIM is not in it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import (
    AutoConfig,
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
    LlavaProcessor,
    PreTrainedModel,
)

from trim.conversation import ASSISTANT_ROLE, IMAGE_TOKEN, SEP, SEP2, SYSTEM_PROMPT, USER_ROLE
from trim.formats.base import VisionSettings, load_llm, read_config, read_model_dir, read_state_dict, stored_dtype
from trim.llm_tokenizer import load_llm_tokenizer

logger = logging.getLogger(__name__)

PROCESSOR_FIELDS = ("size", "crop_size", "do_convert_rgb", "do_resize", "resample", "do_rescale", "rescale_factor",
                    "do_normalize", "do_center_crop", "image_mean", "image_std")
"""The CLIP image processor's settings carried into the export's LLaVA image processor."""

LLM_KEYS = {r"^language_model\.model\.": "model.", r"^language_model\.lm_head\.": "lm_head.",
            r"^model\.language_model\.": "model."}
"""The language model's weight names in llava-hf's and in transformers 5's checkpoints -> a causal LM's."""


CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = messages[0]['content'] -%}"
    "{%- set turns = messages[1:] -%}{%- else -%}{%- set system = " + json.dumps(SYSTEM_PROMPT) + " -%}"
    "{%- set turns = messages -%}{%- endif -%}{{- system + " + json.dumps(SEP) + " -}}"
    "{%- for message in turns -%}{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- set images = 0 -%}{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') -%}"
    "{%- set images = message['content'] | selectattr('type', 'equalto', 'image') | list | length -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{- " + json.dumps(USER_ROLE + ": ") + " + " + json.dumps(IMAGE_TOKEN + "\n")
    + " * images + text + " + json.dumps(SEP) + " -}}{%- else -%}{{- " + json.dumps(ASSISTANT_ROLE + ": ")
    + " + text + " + json.dumps(SEP2) + " -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- " + json.dumps(ASSISTANT_ROLE + ":") + " -}}{%- endif -%}"
)
"""LLaVA-1.5's vicuna_v1 prompt (trim.conversation): system, `USER: <image>\\n...`, ` ASSISTANT:`."""


def vision_settings(path: str | Path) -> VisionSettings:
    """The vision settings of a LlavaForConditionalGeneration checkpoint, from its config files."""
    config = LlavaConfig.from_pretrained(str(path))
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError(f"{path}: features from several layers ({layer}) are not supported")
    vision: Any = config.vision_config
    # A processor without do_pad says nothing of training: llava-hf's converted LLaVA-1.5 checkpoints ship
    # a plain CLIPImageProcessor, though their weights were trained on padded images.
    aspect = None
    for name, section in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
        if (Path(path) / name).exists():
            found = json.loads((Path(path) / name).read_text())
            aspect = "pad" if (found.get(section, {}) if section else found).get("do_pad") else None
            break
    strategy = config.vision_feature_select_strategy
    return VisionSettings(tower=str(path), layer=layer, feature_dim=int(vision.hidden_size), aspect_ratio=aspect,
                          select_feature="patch" if strategy == "default" else "cls_patch", tower_bundled=True,
                          image_size=int(vision.image_size), patch_size=int(vision.patch_size))


def load(path: str | Path, dtype: torch.dtype = torch.float32,
         **kwargs: Any) -> tuple[PreTrainedModel, dict[str, torch.Tensor], VisionSettings]:
    """(LLM as a plain causal LM, projector state in our names, vision settings) of a
    LlavaForConditionalGeneration checkpoint: the LLM loaded alone (renamed weights), so the vision tower
    is never built. kwargs go to from_pretrained (e.g. attn_implementation)."""
    settings = vision_settings(path)
    text_config = LlavaConfig.from_pretrained(str(path)).text_config
    llm = load_llm(path, text_config, dtype, ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                                              "model.multi_modal_projector."), key_mapping=LLM_KEYS, **kwargs)
    projector = {}
    for prefix in ("multi_modal_projector.", "model.multi_modal_projector."):
        for key, value in read_state_dict(path, prefix=prefix).items():
            projector[key[len(prefix):].replace("linear_1.", "0.").replace("linear_2.", "2.")] = value
    if sorted(projector) != ["0.bias", "0.weight", "2.bias", "2.weight"]:
        raise ValueError(f"{path}: expected the projector's linear_1 and linear_2 weights and biases, found "
                         f"{sorted(projector)}")
    return llm, projector, settings


def clip_vision_config(clip: str | Path) -> CLIPVisionConfig:
    """The vision config of a CLIP checkpoint (a CLIPModel's vision_config, or a CLIPVisionModel's own)."""
    config = read_config(clip)
    return CLIPVisionConfig.from_dict(config["vision_config"] if "vision_config" in config else config)


def clip_vision_weights(clip: str | Path) -> dict[str, torch.Tensor]:
    """The vision tower's weights of a CLIP checkpoint, named as in a CLIPVisionModel checkpoint."""
    state = read_state_dict(clip, prefix="vision_model.")
    return {k: v for k, v in state.items() if not k.endswith("position_ids")}


def add_image_token(tokenizer: Any) -> int:
    """The id of `<image>` in the tokenizer, added as a special token if missing."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    return int(tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))


def fit_vocab(state: dict[str, torch.Tensor], token_id: int, multiple: int = 64) -> int | None:
    """Grow the input and output embeddings so `token_id` has a row (to a multiple of `multiple`, as
    llava-hf did); new rows are the mean of the old ones. The new vocabulary size, or None if it fits."""
    key = next(k for k in state if k.endswith("embed_tokens.weight"))
    rows = state[key].shape[0]
    if token_id < rows:
        return None
    size = -(-(token_id + 1) // multiple) * multiple
    for name in (key, "lm_head.weight"):
        if name in state:
            weight = state[name]
            mean = weight.float().mean(dim=0, keepdim=True).to(weight.dtype)
            state[name] = torch.cat([weight, mean.expand(size - rows, -1)])
    return size


def image_processor(clip: str | Path) -> LlavaImageProcessorPil:
    """The CLIP checkpoint's image processor with LLaVA-1.5's padding to square in front."""
    settings = CLIPImageProcessorPil.from_pretrained(str(clip)).to_dict()
    return LlavaImageProcessorPil(do_pad=True, **{k: settings[k] for k in PROCESSOR_FIELDS if k in settings})


def write(model_dir: str | Path, out: str | Path, clip_path: str | Path | None = None) -> Path:
    """Write a model directory (LlavaTrim.save) as a LlavaForConditionalGeneration checkpoint with its
    processor. clip_path: the CLIP checkpoint to bundle; default: the one the model directory records."""
    settings, llm_dir, projector = read_model_dir(model_dir)
    encoder = settings.get("encoder", {})
    clip = clip_path or encoder.get("path")
    if not clip:
        raise ValueError(f"{model_dir} records no CLIP path: pass the CLIP checkpoint")
    vision_config: Any = clip_vision_config(clip)  # image_size and patch_size are typed as unions upstream
    if int(vision_config.hidden_size) != int(settings["feature_dim"]):
        raise ValueError(f"the projector takes {settings['feature_dim']}-wide features, the CLIP at {clip} gives "
                         f"{vision_config.hidden_size}")
    tokenizer = load_llm_tokenizer(llm_dir)
    image_token_id = add_image_token(tokenizer)
    text_config = AutoConfig.from_pretrained(str(llm_dir))
    llm_state = read_state_dict(llm_dir)
    dtype = stored_dtype(llm_state)
    vocab = fit_vocab(llm_state, image_token_id)
    if vocab is not None:
        text_config.vocab_size = vocab
    weights = {f"language_model.{k}": v for k, v in llm_state.items()}
    weights.update({f"vision_tower.{k}": v for k, v in clip_vision_weights(clip).items()})
    weights.update({f"multi_modal_projector.linear_{1 if k.startswith('0.') else 2}.{k[2:]}": v
                    for k, v in projector.items()})
    weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    config = LlavaConfig(vision_config=vision_config, text_config=text_config, image_token_index=image_token_id,
                         image_seq_length=num_patches, vision_feature_layer=int(encoder.get("layer", -2)),
                         vision_feature_select_strategy="default", projector_hidden_act="gelu",
                         multimodal_projector_bias=True, tie_word_embeddings=bool(text_config.tie_word_embeddings))
    config.architectures = ["LlavaForConditionalGeneration"]
    config.dtype = dtype
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    save_torch_state_dict(weights, str(out))
    images = image_processor(clip)
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision_config.patch_size,
                   vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token=IMAGE_TOKEN,
                   num_additional_image_tokens=1).save_pretrained(out)
    images.save_pretrained(out)  # preprocessor_config.json too: readers older than transformers 5 look there
    if (llm_dir / "generation_config.json").exists():
        (out / "generation_config.json").write_bytes((llm_dir / "generation_config.json").read_bytes())
    # `out` may be a staging folder (trim.staging): the caller names the final place.
    logger.info("LlavaForConditionalGeneration export: %d visual tokens per image (no TRIM)", num_patches)
    return out
