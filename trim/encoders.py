"""The frozen CLIP towers TRIM needs, loaded from a checkpoint directory with `from_pretrained`.

One object per process (an actor, a notebook); nothing global, nothing patched. Image side: LLaVA's
preprocessing (pad to square with int(255 * the processor's mean), then the CLIP processor), the hidden
states of a chosen layer with CLS dropped (the projector's input), and the same patches through
post_layernorm + visual_projection (what TRIM scores). Text side: text_embeds, truncated to the
tokenizer's limit (77 for CLIP).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPImageProcessorPil, CLIPModel


def pad_colour(image_mean: Sequence[float]) -> tuple[int, int, int]:
    """LLaVA's padding colour: `int(x * 255)` of each channel's mean, truncated, not rounded
    ((122, 116, 104) for CLIP's mean)."""
    red, green, blue = (int(x * 255) for x in image_mean)
    return red, green, blue


def expand_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Pad an image to a square, centred, as LLaVA-1.5's `expand2square` does."""
    image = image.convert("RGB")
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new("RGB", (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


@dataclass
class ImageFeatures:
    """Per-image outputs of the vision tower."""

    features: torch.Tensor
    """[B, N, D] hidden states of the selected layer, CLS dropped: the projector's input."""
    patch_embeds: torch.Tensor
    """[B, N, E] the same patches through post_layernorm and visual_projection: TRIM's scoring side."""


def checkpoint_hash(path: str | Path) -> str:
    """A short hash of a checkpoint's config (identifies the encoder in cache manifests)."""
    config = Path(path) / "config.json"
    return hashlib.sha256(config.read_bytes()).hexdigest()[:16]


def describe_checkpoint(path: str | Path, layer: int = -2) -> dict:
    """What a cache manifest records about a CLIP checkpoint, read from its config and processor
    files alone (no weights loaded)."""
    from transformers import CLIPConfig

    config = CLIPConfig.from_pretrained(str(path))
    vision: Any = config.vision_config  # a CLIPVisionConfig once loaded (typed as a union upstream)
    image_mean = CLIPImageProcessorPil.from_pretrained(str(path)).image_mean
    return {
        "path": str(path),
        "config_hash": checkpoint_hash(path),
        "layer": layer,
        "image_size": vision.image_size,
        "patch_size": vision.patch_size,
        "num_patches": (vision.image_size // vision.patch_size) ** 2,
        "feature_dim": int(vision.hidden_size),
        "projection_dim": int(config.projection_dim or 0),
        "preprocessing": "llava-1.5: pad to square with int(255 * processor mean), then CLIP processor",
        "image_mean": list(image_mean),
        "pad_colour": list(pad_colour(image_mean)),
    }


class ClipEncoder:
    """CLIP vision + text towers with projections, frozen, for TRIM scoring and LLaVA features."""

    def __init__(self, path: str | Path, layer: int = -2, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.path = str(path)
        self.layer = layer
        self.device = torch.device(device)
        self.dtype = dtype
        self.processor = CLIPImageProcessorPil.from_pretrained(self.path)
        # One CLIPModel holds both towers and both projections, as the checkpoints ship them.
        model: Any = CLIPModel.from_pretrained(self.path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # CLIP's 77 positions bound the text, whatever the tokenizer file says.
        self.max_text_tokens = min(
            int(getattr(self.tokenizer, "model_max_length", 77) or 77),
            int(self.model.config.text_config.max_position_embeddings),
        )

    @property
    def background(self) -> tuple[int, int, int]:
        """LLaVA's padding colour: the processor's mean in 0..255, truncated (see pad_colour)."""
        return pad_colour(self.processor.image_mean)

    @property
    def num_patches(self) -> int:
        config = self.model.config.vision_config
        return (config.image_size // config.patch_size) ** 2

    @property
    def feature_dim(self) -> int:
        return int(self.model.config.vision_config.hidden_size)

    def describe(self) -> dict:
        """What a cache manifest records about this encoder."""
        return describe_checkpoint(self.path, self.layer)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """LLaVA-1.5 preprocessing: pad to square with the mean colour, then CLIP-process. [B,3,H,W]."""
        squared = [expand_to_square(image, self.background) for image in images]
        pixels = self.processor(images=squared, return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Selected-layer patch features and their projected embeddings for preprocessed images."""
        out = self.model.vision_model(pixel_values=pixel_values.to(self.device, self.dtype), output_hidden_states=True)
        features = out.hidden_states[self.layer][:, 1:]
        patch_embeds = self.model.visual_projection(self.model.vision_model.post_layernorm(features))
        return ImageFeatures(features=features, patch_embeds=patch_embeds)

    def encode_images(self, images: Sequence[Image.Image]) -> ImageFeatures:
        return self.encode_pixels(self.preprocess(images))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text_embeds [B, E] (unnormalised), texts truncated to the tokenizer's limit."""
        inputs = self.tokenizer(
            list(texts), return_tensors="pt", truncation=True, padding=True, max_length=self.max_text_tokens
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**inputs).pooler_output
        return self.model.text_projection(pooled)


def encoder_summary(path: str | Path) -> str:
    """One line for logs: which encoder, which config hash."""
    config = json.loads((Path(path) / "config.json").read_text())
    vision = config.get("vision_config", {})
    return f"{path} (image {vision.get('image_size')}, patch {vision.get('patch_size')}, hash {checkpoint_hash(path)})"
