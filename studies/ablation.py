"""The paper's ablation (its Table 3) in miniature, on synthetic scenes whose answers need the image.

Held-out scenes are asked the colour of a named shape, where a named object is, and how many shapes
there are (single-word answers). One frozen CLIP (the project's tiny one) encodes every scene once; each
row then reduces the same features its own way (trim/core.py: TRIM with either sign, TRIM without the
aggregate token, uniform pooling to TRIM's count, random patches of TRIM's count, or all 576), and a
fresh tiny LLaVA (projector + LLM, same seeds, same steps) is fine-tuned on the reduced tokens and
scored on the held-out questions, once per model seed (studies/ablation_seeds.py: the seeds' mean and
spread per row). Accuracy is exact match of the greedy answer, computed teacher-forced
(every answer token and the end token the argmax: exactly when greedy decoding produces the answer).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_cosine_schedule_with_warmup

from synthetic.scenes import Scene, random_scene, render
from trim.batching import pad_batch
from trim.config import TrimConfig
from trim.conversation import IGNORE_INDEX, tokenize_conversation
from trim.core import trim_tokens
from trim.encoders import ClipEncoder
from trim.formats import load_llava_trim
from trim.model import LlavaTrim

logger = logging.getLogger(__name__)

SHORT = "Answer the question using a single word or phrase."
KINDS = {"colour": 0.45, "position": 0.45, "count": 0.1}
"""Question kinds and their shares (counting has the fewest answers, 1-3: a small share keeps the
majority-answer baseline low)."""
LOSS_WINDOW = 25
"""Steps per point of the recorded loss curve (the mean loss of each window: one step's loss is noisy)."""


@dataclass(frozen=True)
class AblationConfig:
    """The miniature ablation's data, model and training."""

    train_scenes: int = 4000
    """Training scenes (one question each)."""
    eval_scenes: int = 600
    """Held-out scenes (another seed), one question each."""
    steps: int = 300
    """Optimizer steps per row and seed (docs/studies.md: where the loss flattens, what fewer cost)."""
    batch_size: int = 16
    """Samples per step (packed into rows)."""
    lr: float = 2e-3
    """Peak learning rate (warmup 3%, cosine decay)."""
    llm_hidden: int = 128
    """Width of the tiny LLM trained with the projector."""
    llm_depth: int = 4
    """Layers of the tiny LLM."""
    seed: int = 0
    """Seeds the scenes and the questions (the same for every model seed), and the first model seed."""
    seeds: int = 1
    """Model seeds per row: seed, seed + 1, ... Each seeds a fresh model's initialisation (LLM and
    projector) and the order of its batches; the scenes, the questions, the CLIP features and each
    row's reduction stay the same, so the spread across seeds is the training's run-to-run spread."""


@dataclass(frozen=True)
class Sample:
    """One question about one scene."""

    scene: int
    kind: str
    question: str
    answer: str


def ask(scene: Scene, index: int, rng: random.Random) -> Sample | None:
    """One question of a random kind about one of the scene's objects whose shape is unique (so "the
    triangle" names one object); None when the kind drawn needs such an object and the scene has none."""
    kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
    objects = scene.objects
    if kind == "count":
        return Sample(index, "count", "How many shapes are there?", str(len(objects)))
    unique = [o for o in objects if len(scene.with_shape(o.shape)) == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    if kind == "colour":
        return Sample(index, kind, f"What is the colour of the {obj.shape}?", obj.colour)
    return Sample(index, kind, f"Where is the {obj.colour} {obj.shape}?", obj.position)


def make_split(num: int, seed: int) -> tuple[list[Scene], list[Sample]]:
    """num scenes, one question each. A scene that cannot be asked its drawn kind is drawn again, so
    the kinds keep KINDS' shares (answering "how many" instead made counting a fifth of the questions,
    and its skewed answers lifted the majority-answer baseline above 0.2)."""
    rng = random.Random(seed)
    scenes: list[Scene] = []
    samples: list[Sample] = []
    while len(scenes) < num:
        scene = random_scene(rng, max_objects=3)
        sample = ask(scene, len(scenes), rng)
        if sample is not None:
            scenes.append(scene)
            samples.append(sample)
    return scenes, samples


def chance(samples: Sequence[Sample]) -> float:
    """Accuracy of answering each kind's most common answer (the best answer that ignores the image)."""
    hits = 0
    for kind in KINDS:
        answers = Counter(s.answer for s in samples if s.kind == kind)
        hits += answers.most_common(1)[0][1] if answers else 0
    return hits / len(samples)


def variants(trim_cfg: TrimConfig) -> dict[str, TrimConfig]:
    """The rows. TRIM's own sign is `trim_cfg`'s; the baselines keep its counts."""
    other = dataclasses.replace(trim_cfg, keep="most_similar" if trim_cfg.keep == "least_similar" else "least_similar",
                                similarity="cosine" if trim_cfg.keep == "least_similar" else "dot")
    return {
        "full": dataclasses.replace(trim_cfg, selection="all"),
        "trim": trim_cfg,
        "trim_no_aggregate": dataclasses.replace(trim_cfg, aggregate=False),
        "uniform": dataclasses.replace(trim_cfg, selection="pool"),
        "random": dataclasses.replace(trim_cfg, selection="random"),
        "trim_other_sign": other,
    }


@dataclass
class Encoded:
    """A split encoded once: the projector's input and TRIM's scoring side per scene, the question's
    text embedding per sample."""

    features: torch.Tensor
    patch_embeds: torch.Tensor
    text_embeds: torch.Tensor


@torch.no_grad()
def encode(encoder: ClipEncoder, scenes: Sequence[Scene], samples: Sequence[Sample], batch: int = 32) -> Encoded:
    features, patches = [], []
    for start in range(0, len(scenes), batch):
        out = encoder.encode_images([render(s) for s in scenes[start:start + batch]])
        features.append(out.features.half())
        patches.append(out.patch_embeds.half())
    texts = [encoder.encode_texts([s.question for s in samples[i:i + 256]]) for i in range(0, len(samples), 256)]
    return Encoded(torch.cat(features), torch.cat(patches), torch.cat(texts))


@torch.no_grad()
def reduce(encoded: Encoded, samples: Sequence[Sample], cfg: TrimConfig, batch: int = 64) -> list[torch.Tensor]:
    """Each sample's visual tokens under one row's reduction (fp32)."""
    tokens: list[torch.Tensor] = []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        index = torch.tensor([s.scene for s in chunk])
        out = trim_tokens(encoded.features[index].float(), encoded.patch_embeds[index].float(),
                          encoded.text_embeds[start:start + batch].float(), cfg,
                          seeds=[cfg.seed + start + i for i in range(len(chunk))])
        tokens.extend(t.float() for t in out.tokens)
    return tokens


def tokenize(samples: Sequence[Sample], visual: Sequence[torch.Tensor], tokenizer) -> list[dict]:
    out = []
    for sample, tokens in zip(samples, visual):
        turns = [{"from": "human", "value": f"<image>\n{sample.question}\n{SHORT}"},
                 {"from": "gpt", "value": sample.answer}]
        tok = tokenize_conversation(turns, tokenizer, max_length=4096, num_visual_tokens=tokens.shape[0])
        out.append({"input_ids": tok.input_ids, "labels": tok.labels, "visual": tokens})
    return out


def fit(model: LlavaTrim, train: list[dict], cfg: AblationConfig, pad_id: int, seed: int) -> tuple[float, list[list]]:
    """Train in place with `seed`'s batch order; return the mean seconds per step and the loss curve
    ([last step, mean loss] per LOSS_WINDOW steps, where it flattens says how many steps are enough)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, cfg.steps // 33), cfg.steps)
    order = random.Random(seed)
    model.train()
    curve: list[list] = []
    window: list[float] = []
    started = time.perf_counter()
    for step in range(cfg.steps):
        batch = pad_batch(order.sample(train, cfg.batch_size), pad_id)
        loss = model(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        window.append(loss.item())
        if len(window) == LOSS_WINDOW or step == cfg.steps - 1:
            curve.append([step + 1, round(sum(window) / len(window), 4)])
            window = []
        if step % 250 == 0 or step == cfg.steps - 1:
            logger.info("  step %d/%d loss %.3f", step + 1, cfg.steps, loss.item())
    return (time.perf_counter() - started) / cfg.steps, curve


@torch.no_grad()
def correct(model: LlavaTrim, samples: list[dict], pad_id: int, batch: int = 64) -> list[bool]:
    """Per sample: is every supervised token (the answer and its end token) the argmax given the ones
    before it? That is exactly when greedy decoding returns the answer."""
    model.eval()
    hits: list[bool] = []
    for start in range(0, len(samples), batch):
        embeds, mask, labels = model.splice(pad_batch(samples[start:start + batch], pad_id))
        logits = model.llm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        predicted = logits[:, :-1].argmax(-1)
        target = labels[:, 1:]
        supervised = target != IGNORE_INDEX
        hits.extend(((predicted == target) | ~supervised).all(dim=1).tolist())
    return hits


@dataclass
class RowData:
    """One row's reduced and tokenized splits (the same for every model seed)."""

    name: str
    trim: TrimConfig
    train: list[dict]
    held_out: list[dict]
    kinds: list[str]
    """The held-out samples' question kinds, in order."""
    mean_visual_tokens: float


def prepare_row(name: str, cfg: TrimConfig, train: tuple[Encoded, list[Sample]],
                held_out: tuple[Encoded, list[Sample]], tokenizer) -> RowData:
    """Reduce both splits the row's way and tokenize them."""
    train_tokens = reduce(*train, cfg)
    eval_tokens = reduce(*held_out, cfg)
    mean_tokens = sum(t.shape[0] for t in eval_tokens) / len(eval_tokens)
    logger.info("row %s: %.1f visual tokens per image on average", name, mean_tokens)
    return RowData(name, cfg, tokenize(train[1], train_tokens, tokenizer),
                   tokenize(held_out[1], eval_tokens, tokenizer), [s.kind for s in held_out[1]], mean_tokens)


def run_seed(row: RowData, llm_path: Path, ablation: AblationConfig, seed: int) -> dict:
    """Fine-tune a fresh tiny LLaVA (the LLM at llm_path, built with `seed`; the projector drawn with
    it) on one row's tokens and score it: one seed of one row."""
    from trim.llm_tokenizer import load_llm_tokenizer

    pad_id = load_llm_tokenizer(llm_path).pad_token_id
    torch.manual_seed(seed)
    model = load_llava_trim(llm_path, feature_dim=row.train[0]["visual"].shape[-1], attn_implementation="sdpa")
    step_s, curve = fit(model, row.train, ablation, pad_id, seed)
    hits = correct(model, row.held_out, pad_id)
    by_kind = {k: [h for h, kind in zip(hits, row.kinds) if kind == k] for k in KINDS}
    return {"row": row.name, "seed": seed, "accuracy": sum(hits) / len(hits),
            **{f"accuracy_{k}": sum(v) / max(1, len(v)) for k, v in by_kind.items()},
            "mean_visual_tokens": row.mean_visual_tokens, "step_seconds": step_s, "loss_curve": curve}
