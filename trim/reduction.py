"""TRIM on images at inference: CLIP's vision tower over prepared pixels, then TRIM against the texts'
CLIP embeddings, over the batch as given or each image as in a batch of one (as the released
evaluation, which answers one question at a time)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from PIL import Image

from trim.config import TrimConfig
from trim.core import TrimOutput, trim_tokens
from trim.encoders import ClipEncoder


def reduce_images(encoder: ClipEncoder, images: Sequence[Image.Image], texts: Sequence[str],
                  cfg: TrimConfig, alone: bool = False) -> TrimOutput:
    """reduce_pixels of the images prepared by the encoder's host side (LLaVA's padding, CLIP's resize)
    and of the texts' CLIP embeddings."""
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts")
    if not images:
        raise ValueError("no images")
    return reduce_pixels(encoder, encoder.host.prepare(list(images)), encoder.encode_texts(list(texts)), cfg, alone)


def reduce_pixels(encoder: ClipEncoder, pixels: torch.Tensor, text_embeds: torch.Tensor,
                  cfg: TrimConfig, alone: bool = False) -> TrimOutput:
    """CLIP over 8-bit pixels (uint8 [B, 3, H, W], ClipHost.prepare's; one forward), then TRIM
    against the texts' CLIP embeddings [B, E]. alone=False: TRIM over the
    batch as given (with iqr_scope "batch", one IQR and one count for the batch, as the released
    training). alone=True: each image's tokens as it would get them in a batch of one, as at
    evaluation: a batch-wide IQR is taken over each image by itself, and the "random" baseline is
    seeded as a batch of one."""
    if len(pixels) != len(text_embeds):
        raise ValueError(f"{len(pixels)} images but {len(text_embeds)} texts")
    if not len(pixels):
        raise ValueError("no images")
    features = encoder.towers.encode_levels(pixels)
    if not alone:
        return trim_tokens(features.features, features.patch_embeds, text_embeds, cfg)
    # The released evaluation upcasts the features to fp32 before scoring (clip_encoder.py, "NOTE:
    # eval"), whatever dtype the model runs in: "encoder" scoring at inference means fp32.
    cfg = dataclasses.replace(cfg, score_dtype="float32")
    if cfg.iqr_scope == "batch" and cfg.threshold == "iqr" and len(pixels) > 1:
        return concat_outputs([trim_tokens(features.features[i:i + 1], features.patch_embeds[i:i + 1],
                                           text_embeds[i:i + 1], cfg, seeds=[cfg.seed]) for i in range(len(pixels))])
    return trim_tokens(features.features, features.patch_embeds, text_embeds, cfg, seeds=[cfg.seed] * len(pixels))


def concat_outputs(outputs: Sequence[TrimOutput]) -> TrimOutput:
    """TRIM outputs of consecutive parts of a batch as one."""
    return TrimOutput(keep_mask=torch.cat([o.keep_mask for o in outputs]),
                      scores=torch.cat([o.scores for o in outputs]), num_kept=torch.cat([o.num_kept for o in outputs]),
                      tokens=[t for o in outputs for t in o.tokens],
                      has_aggregate=torch.cat([o.has_aggregate for o in outputs]))
