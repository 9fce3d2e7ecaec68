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
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessorPil, CLIPModel


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
    """A short hash of a checkpoint directory's files (identifies the encoder in cache manifests): the
    name, size and SHA-256 of every file at its top (config, weights, processor and tokenizer files;
    dot files left out), so new weights under the same config give another hash. A file's digest is
    remembered in the process by (path, size, mtime): a second call costs a stat per file."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith(".")):
        info = file.stat()
        content = _file_sha256(str(file.resolve()), info.st_size, info.st_mtime_ns)
        digest.update(f"{file.name}\0{info.st_size}\0{content}\n".encode())
    return digest.hexdigest()[:16]


@lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """SHA-256 of a file, streamed; size and mtime_ns are the cache key: a rewritten file is hashed again."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def describe_checkpoint(path: str | Path, layer: int = -2) -> dict:
    """What a cache manifest records about a CLIP checkpoint, read from its config and processor
    files alone (no weights loaded)."""
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


def pixel_table(image_mean: Sequence[float], image_std: Sequence[float], rescale: float | None = 1 / 255,
                normalize: bool = True) -> torch.Tensor:
    """[3, 256] fp32: the processed value of each 8-bit level per channel, computed as the CLIP
    processor does it (level * rescale in float64, cast to fp32, then (x - mean) / std in fp32), so
    looking levels up reproduces its pixel values bit for bit on any device."""
    levels = np.arange(256, dtype=np.float64)
    values = (levels * rescale if rescale is not None else levels).astype(np.float32)
    rows = [(values - np.float32(m)) / np.float32(s) if normalize else values for m, s in zip(image_mean, image_std)]
    return torch.from_numpy(np.stack(rows))


def vision_features(model: Any, pixel_values: torch.Tensor, layer: int) -> ImageFeatures:
    """hidden_states[layer] of a CLIPModel's vision tower (CLS dropped) and their projected
    embeddings, running only the encoder layers that layer needs (the last one is skipped for the
    penultimate layer): embeddings, pre-layernorm, then layers one by one, as the tower's forward."""
    vision = model.vision_model
    layers = vision.encoder.layers
    count = layer if layer >= 0 else len(layers) + 1 + layer
    if not 0 <= count <= len(layers):
        raise ValueError(f"layer {layer} of a {len(layers)}-layer vision tower")
    hidden = vision.pre_layrnorm(vision.embeddings(pixel_values))
    for block in layers[:count]:
        hidden = block(hidden, None)
    features = hidden[:, 1:]
    return ImageFeatures(features=features, patch_embeds=model.visual_projection(vision.post_layernorm(features)))


def text_features(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """A CLIPModel's text_embeds [B, E] (unnormalised) for tokenized texts."""
    pooled = model.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output
    return model.text_projection(pooled)


class ClipTowers:
    """The device side of the CLIP encoder: 8-bit pixels normalized on the device (pixel_table), the
    vision tower up to the selected layer, the text tower on token ids. Built from a CLIPModel and the
    processor's constants, so a model built in memory (benchmarks) runs the same code."""

    def __init__(self, model: Any, layer: int, image_mean: Sequence[float], image_std: Sequence[float],
                 rescale: float | None = 1 / 255, normalize: bool = True):
        self.model = model
        self.layer = layer
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.table = pixel_table(image_mean, image_std, rescale, normalize).to(self.device, self.dtype)
        self._zero: ImageFeatures | None = None

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (any device) -> processed pixel values on the device, in the towers' dtype."""
        levels = pixels.to(self.device, non_blocking=True).to(torch.int32)
        return torch.stack([self.table[c][levels[:, c]] for c in range(levels.shape[1])], dim=1)

    @torch.no_grad()
    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        return vision_features(self.model, pixel_values.to(self.device, self.dtype), self.layer)

    @torch.no_grad()
    def encode_levels(self, pixels: torch.Tensor) -> ImageFeatures:
        """Features of 8-bit pixels (see prepare): normalized and encoded on the device."""
        return vision_features(self.model, self.normalize(pixels), self.layer)

    @torch.no_grad()
    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = None if attention_mask is None else attention_mask.to(self.device, non_blocking=True)
        return text_features(self.model, input_ids.to(self.device, non_blocking=True), mask)

    def zero_image(self) -> ImageFeatures:
        """Features of the all-zero pixel values LLaVA gives a text-only sample (computed once)."""
        if self._zero is None:
            size = self.model.config.vision_config.image_size
            self._zero = self.encode_pixels(torch.zeros(1, 3, size, size, device=self.device, dtype=self.dtype))
        return self._zero


class ClipEncoder:
    """CLIP vision + text towers with projections, frozen, for TRIM scoring and LLaVA features. The host
    side (padding, resizing, tokenizing) and the device side (ClipTowers) can run apart: `prepare` and
    `tokenize` in CPU workers, `towers` on the GPU."""

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
        self.host = ClipHost(self.path, self.processor)
        self.tokenizer = self.host.tokenizer
        self.max_text_tokens = self.host.max_text_tokens
        self.towers = ClipTowers(self.model, layer, **self.host.pixel_constants())

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
        """LLaVA-1.5 preprocessing: pad to square with the mean colour, then CLIP-process. [B,3,H,W] on
        the device: the CLIP processor's pixel values exactly (resized on the host, normalized here)."""
        return self.towers.normalize(self.host.prepare(images))

    def encode_pixels(self, pixel_values: torch.Tensor) -> ImageFeatures:
        """Selected-layer patch features and their projected embeddings for preprocessed images."""
        return self.towers.encode_pixels(pixel_values)

    def encode_images(self, images: Sequence[Image.Image]) -> ImageFeatures:
        return self.towers.encode_levels(self.host.prepare(images))

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """CLIP text_embeds [B, E] (unnormalised), texts truncated to the tokenizer's limit."""
        ids, mask = self.host.tokenize(texts, self.max_text_tokens)
        return self.towers.encode_tokens(ids, mask)


class ClipHost:
    """The host side of a CLIP checkpoint: LLaVA's padding and the processor's resizing to 8-bit
    pixels, and the tokenizer. Light (no weights): what CPU preprocessing workers load."""

    def __init__(self, path: str | Path, processor: Any = None):
        self.processor = processor or CLIPImageProcessorPil.from_pretrained(str(path))
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        # The text tower's positions (77 for CLIP) bound the text, whatever the tokenizer file says.
        text_config: Any = CLIPConfig.from_pretrained(str(path)).text_config
        positions = int(text_config.max_position_embeddings)
        self.max_text_tokens = min(int(getattr(self.tokenizer, "model_max_length", positions) or positions), positions)
        self.background = pad_colour(self.processor.image_mean)
        self._side = _square_side(self.processor)

    def prepare(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """uint8 [B, 3, H, W]: each image padded to square with the mean colour (LLaVA's expand2square)
        and resized and cropped as the CLIP processor does, before its rescaling and normalization."""
        squared = [expand_to_square(image, self.background) for image in images]
        if self._side:  # what the processor does to a square image, without its array round trips
            side = (self._side, self._side)
            arrays = [np.asarray(s if s.size == side else s.resize(side, self._resample)) for s in squared]
            return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())
        out = self.processor(images=squared, do_rescale=False, do_normalize=False, return_tensors="np")
        return torch.from_numpy(np.asarray(out["pixel_values"], dtype=np.uint8))

    def pixel_constants(self) -> dict[str, Any]:
        """ClipTowers' keyword arguments for this processor's rescaling and normalization."""
        processor = self.processor
        return {"image_mean": processor.image_mean, "image_std": processor.image_std,
                "rescale": processor.rescale_factor if processor.do_rescale else None,
                "normalize": bool(processor.do_normalize)}

    @property
    def _resample(self) -> Any:
        return Image.Resampling(int(self.processor.resample))

    def tokenize(self, texts: Sequence[str], max_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, L], L the longest text's length up to the limit."""
        inputs = self.tokenizer(list(texts), return_tensors="pt", truncation=True, padding=True,
                                max_length=max_tokens or self.max_text_tokens)
        return inputs["input_ids"], inputs["attention_mask"]


def _square_side(processor: Any) -> int | None:
    """The side a square image ends at when the processor's resize and crop amount to one resize to a
    fixed square (shortest edge S, centre crop S x S, as CLIP's), else None (use the processor)."""
    size, crop = dict(processor.size or {}), dict(processor.crop_size or {})
    side = size.get("shortest_edge")
    if (processor.do_resize and processor.do_center_crop and side and set(size) == {"shortest_edge"}
            and crop.get("height") == crop.get("width") == side):
        return int(side)
    return None


def encoder_summary(path: str | Path) -> str:
    """One line for logs: which encoder, which encoder checkpoint hash."""
    config = json.loads((Path(path) / "config.json").read_text())
    vision = config.get("vision_config", {})
    return f"{path} (image {vision.get('image_size')}, patch {vision.get('patch_size')}, hash {checkpoint_hash(path)})"
