"""Training the project's tiny CLIP on synthetic scenes (jobs/train_clip.py is the entry point).

No pretrained CLIP can be downloaded here, and a randomly initialised one scores patches against text
at random, so the project trains its own at the real geometry (336 px, patch 14, 576 patches).

Two contrastive terms over a batch of scenes and texts, each with multi-positive targets (a text
names objects; it matches every scene of the batch that has them, see scene_texts):
- global, as CLIP: the pooled image embedding against the text embedding;
- per patch, what TRIM scores: the selected layer's patches (hidden_states[-2], CLS dropped) through
  post_layernorm and visual_projection, against the same text embedding; an image-text score is a
  smooth maximum over the patches (log-sum-exp), so a text must meet the patches of what it names.
  (FILIP's token-wise maximum, with the pooled text embedding as the single text token, since that is
  the vector TRIM compares patches with.)
- per region, what makes patches know what they show: each patch an object covers is classified
  among the batch's object texts (a phrase or question about one object of each scene) and a
  background text, its targets the texts that fit its object; every other patch's target is the
  background text. The two terms above only need the best patch of an image to meet a text; this one
  asks it of every patch, so the selected layer's patches carry their object's shape and colour (what
  the fine-tuned LLM reads) and the background stays unlike every object.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import CLIPModel, PreTrainedTokenizerBase

from synthetic.scene_texts import SceneText, caption, object_phrase, object_question, random_text
from synthetic.scenes import CLIP_SIZE, Scene, patch_masks, random_scene, render
from trim.encoders import expand_to_square, pad_colour

logger = logging.getLogger("studies.clip_training")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ClipTrainConfig:
    """How the tiny CLIP is trained."""

    steps: int = 3000
    """Optimizer steps."""
    batch_size: int = 48
    """Scenes (and texts, one per scene) per step: the contrastive negatives."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warmup, cosine decay)."""
    warmup: int = 100
    """Warmup steps."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    patch_weight: float = 1.0
    """Weight of the per-patch term against the global one."""
    region_weight: float = 1.0
    """Weight of the per-region term (0: off, as the first shipped model was trained)."""
    background_text: str = "the background"
    """The text background patches are classified as in the per-region term."""
    patch_temperature: float = 0.05
    """Temperature of the smooth maximum over patches (smaller: closer to the hard maximum)."""
    layer: int = -2
    """Hidden layer whose patches the per-patch term uses (TRIM's and LLaVA's: the penultimate)."""
    seed: int = 0
    """Seeds the scenes, the texts and the initialisation."""
    threads: int = 0
    """torch threads (0: torch's default)."""
    position_init: float = 0.0
    """Scale of a 2-D sine-cosine initialisation of the vision position embeddings (0: transformers'
    own, std 0.02, as models/tiny-clip was trained). Left at that, the tiny ViT learns no position (its
    trained embeddings vary 0.05 across patches against the patch content's 0.93; a linear probe reads
    an object's grid cell from its features at 0.14, chance 0.11); at 1.0 the probe reads 0.90, as a
    real CLIP's features tell where a patch is, but the tiny LLaVA did not learn to use it (docs/studies.md)."""


def preprocess(images: list[Image.Image]) -> torch.Tensor:
    """LLaVA-1.5's preprocessing without the processor's per-call overhead: pad to a square with
    int(255 * mean), resize to 336 (bicubic), scale, normalise. [B, 3, 336, 336] fp32."""
    background = pad_colour(CLIP_MEAN)
    arrays = [np.asarray(expand_to_square(im, background).resize((CLIP_SIZE, CLIP_SIZE), Image.Resampling.BICUBIC))
              for im in images]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


@dataclass(frozen=True)
class Batch:
    """One step's scenes and texts."""

    scenes: list[Scene]
    texts: list[SceneText]
    """One text per scene (caption, phrase or question), for the image-text terms."""
    region_texts: list[SceneText]
    """One text per object of every scene, in scene then object order, for the per-region term."""


def batches(seed: int, batch_size: int) -> Iterator[Batch]:
    """An endless stream of batches, deterministic for a seed."""
    rng = random.Random(seed)
    while True:
        scenes = [random_scene(rng) for _ in range(batch_size)]
        texts = [random_text(s, rng) for s in scenes]
        regions = [(object_phrase if rng.random() < 0.5 else object_question)(o, rng)
                   for s in scenes for o in s.objects]
        yield Batch(scenes, texts, regions)


def match_matrix(scenes: list[Scene], texts: list[SceneText]) -> torch.Tensor:
    """[images, texts] bool: which texts match which scenes (the diagonal always does)."""
    return torch.tensor([[t.matches(s) for t in texts] for s in scenes])


def multi_positive_loss(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where each row's target spreads evenly over its positives."""
    targets = positives.float()
    image_to_text = -(targets / targets.sum(1, keepdim=True) * F.log_softmax(logits, dim=1)).sum(1).mean()
    text_to_image = -(targets / targets.sum(0, keepdim=True) * F.log_softmax(logits, dim=0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def embed_texts(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> torch.Tensor:
    """Pooled text embeddings through text_projection [T, E] (what TRIM scores against)."""
    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    out = model.text_model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    return model.text_projection(out.pooler_output)


def patch_embeds(model: CLIPModel, pixels: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled image embeddings [B, E], the selected layer's patch embeddings [B, N, E]), both through
    post_layernorm and visual_projection as TRIM's scoring sees them."""
    out = model.vision_model(pixel_values=pixels, output_hidden_states=True)
    vision = model.vision_model
    pooled = model.visual_projection(out.pooler_output)
    patches = model.visual_projection(vision.post_layernorm(out.hidden_states[layer][:, 1:]))
    return pooled, patches


def region_targets(scenes: list[Scene], region_texts: list[SceneText]) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, N, R + 1] bool: which texts each patch should match, the last being the background text;
    [B, N] bool: the patches an object covers)."""
    masks = [torch.from_numpy(patch_masks(s)) for s in scenes]
    on_object = torch.stack([m.any(0) for m in masks])
    targets = torch.zeros(*on_object.shape, len(region_texts) + 1, dtype=torch.bool)
    targets[..., -1] = ~on_object
    for b, scene in enumerate(scenes):
        for obj, mask in zip(scene.objects, masks[b]):
            fits = torch.tensor([t.specs[0].fits(obj) for t in region_texts] + [False])
            targets[b, mask] = fits
    return targets, on_object


def region_loss(patches: torch.Tensor, region_text: torch.Tensor, targets: torch.Tensor, on_object: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each patch over the region texts (normalized [R + 1, E]), its target spread
    over the texts that fit; object and background patches weigh half each."""
    logits = scale * torch.einsum("bne,te->bnt", F.normalize(patches, dim=-1), region_text)
    spread = targets.float() / targets.sum(-1, keepdim=True).clamp(min=1)
    per_patch = -(spread * F.log_softmax(logits, dim=-1)).sum(-1)
    halves = [per_patch[on_object].mean(), per_patch[~on_object].mean()]
    return torch.stack([h for h in halves if h.isfinite()]).mean()


def losses(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, batch: Batch, cfg: ClipTrainConfig,
           patch_scale: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"global", "patch", "region"} losses of one batch ("region" 0 when its weight is)."""
    scenes, texts = batch.scenes, batch.texts
    pixels = preprocess([render(s) for s in scenes])
    all_texts = [t.text for t in texts]
    if cfg.region_weight:
        all_texts += [t.text for t in batch.region_texts] + [cfg.background_text]
    embedded = F.normalize(embed_texts(model, tokenizer, all_texts), dim=-1)
    text = embedded[:len(texts)]
    pooled, patches = patch_embeds(model, pixels, cfg.layer)
    positives = match_matrix(scenes, texts)
    scale = model.logit_scale.exp().clamp(max=100)
    global_loss = multi_positive_loss(scale * F.normalize(pooled, dim=-1) @ text.t(), positives)
    cos = torch.einsum("bne,te->btn", F.normalize(patches, dim=-1), text)
    smooth_max = cfg.patch_temperature * torch.logsumexp(cos / cfg.patch_temperature, dim=-1)
    patch_loss = multi_positive_loss(patch_scale.exp().clamp(max=100) * smooth_max, positives)
    region = torch.zeros(())
    if cfg.region_weight:
        targets, on_object = region_targets(scenes, batch.region_texts)
        region = region_loss(patches, embedded[len(texts):], targets, on_object, patch_scale.exp().clamp(max=100))
    return {"global": global_loss, "patch": patch_loss, "region": region}


@torch.no_grad()
def retrieval_accuracy(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, num: int = 100, seed: int = 12345,
                       layer: int = -2) -> dict[str, float]:
    """Image -> caption top-1 over `num` held-out scenes (chance 1/num), by the pooled embedding and by
    the per-patch smooth maximum."""
    rng = random.Random(seed)
    scenes = [random_scene(rng) for _ in range(num)]
    texts = [caption(s) for s in scenes]
    model.eval()
    text = F.normalize(embed_texts(model, tokenizer, [t.text for t in texts]), dim=-1)
    pooled, patches = [], []
    for start in range(0, num, 25):
        p, q = patch_embeds(model, preprocess([render(s) for s in scenes[start:start + 25]]), layer)
        pooled.append(p)
        patches.append(q)
    image = F.normalize(torch.cat(pooled), dim=-1)
    cos = torch.einsum("bne,te->btn", F.normalize(torch.cat(patches), dim=-1), text).amax(-1)
    # A caption may fit several scenes (the same objects); any that fits counts as right.
    fits = match_matrix(scenes, texts)
    by_pooled = fits[torch.arange(num), (image @ text.t()).argmax(1)].float().mean().item()
    by_patch = fits[torch.arange(num), cos.argmax(1)].float().mean().item()
    return {"retrieval_top1": by_pooled, "retrieval_top1_patch": by_patch, "retrieval_chance": 1 / num}


def sincos_positions(grid: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """[grid * grid, width] 2-D sine-cosine position codes in raster order (as MAE initialises a ViT):
    the first half of the channels encode the row, the second the column, each as sines and cosines
    at frequencies spaced geometrically from 1 down to 1/100 radian a patch."""
    if width % 4:
        raise ValueError(f"sincos_positions: width {width} is not a multiple of 4")
    quarter = width // 4
    frequencies = 100.0 ** (-torch.arange(quarter, dtype=torch.float64) / max(1, quarter - 1))
    index = torch.arange(grid, dtype=torch.float64)
    angles = index[:, None] * frequencies[None, :]  # [grid, quarter]
    codes = torch.cat([angles.sin(), angles.cos()], dim=1)  # [grid, width / 2]
    rows = codes[:, None, :].expand(grid, grid, width // 2)
    cols = codes[None, :, :].expand(grid, grid, width // 2)
    return (scale * torch.cat([rows, cols], dim=-1).reshape(grid * grid, width)).float()


def init_positions(model: CLIPModel, scale: float) -> None:
    """Overwrite the vision tower's patch position embeddings with `sincos_positions` x scale (the
    class token's stays); they are trained from there."""
    embedding = model.vision_model.embeddings.position_embedding.weight
    grid = int(round(math.sqrt(embedding.shape[0] - 1)))
    with torch.no_grad():
        embedding[1:] = sincos_positions(grid, embedding.shape[1], scale)


def train(model: CLIPModel, tokenizer: PreTrainedTokenizerBase, cfg: ClipTrainConfig, log_every: int = 50) -> dict:
    """Train in place; return the final figures (losses, retrieval, seconds)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.position_init:
        init_positions(model, cfg.position_init)
    patch_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [p for p in model.parameters() if p.requires_grad] + [patch_scale]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def schedule(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        return 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    stream = batches(cfg.seed, cfg.batch_size)
    start = time.perf_counter()
    parts = {"global": torch.tensor(0.0), "patch": torch.tensor(0.0), "region": torch.tensor(0.0)}
    model.train()
    for step in range(cfg.steps):
        parts = losses(model, tokenizer, next(stream), cfg, patch_scale)
        loss = parts["global"] + cfg.patch_weight * parts["patch"] + cfg.region_weight * parts["region"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % log_every == 0 or step == cfg.steps - 1:
            elapsed = time.perf_counter() - start
            logger.info("step %d/%d  global %.3f  patch %.3f  region %.3f  %.2f s/step", step + 1, cfg.steps,
                        parts["global"].item(), parts["patch"].item(), parts["region"].item(), elapsed / (step + 1))
    seconds = time.perf_counter() - start
    figures = retrieval_accuracy(model, tokenizer, layer=cfg.layer)
    model.eval()
    return {"loss_global": parts["global"].item(), "loss_patch": parts["patch"].item(),
            "loss_region": parts["region"].item(), "train_seconds": seconds, **figures}
