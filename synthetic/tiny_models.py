"""Tiny models for the embedded default and the tests: built from configs, saved with save_pretrained.

No weights can be downloaded here, so a tiny CLIP (real geometry: 336 px, patch 14, 576 patches) and a
tiny Llama-architecture LM are made locally, with byte-level BPE tokenizers trained on a small corpus.
Everything downstream loads them with `from_pretrained`, the path a real checkpoint takes.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from trim.conversation import SYSTEM_PROMPT

# Words of the synthetic mixture (synthetic/mixture.py draws its questions and answers from these).
VOCABULARY = (
    "what is the colour of object in image picture photo how many are there where located left right top "
    "bottom middle a an the on in at of with and or is are yes no red green blue yellow black white orange "
    "purple brown grey cat dog car bus person man woman child tree house sign book table chair cup bottle "
    "one two three four five six seven eight nine ten describe briefly detail scene text title author "
    "genre this that which kind type answer question using single word phrase provide bounding box region "
    "coordinates sentence short reference please write a story about explain why because sky water road "
    "street building window door wall grass field sitting standing holding riding wearing looking next to "
    "circle square triangle star cross diamond circles squares triangles stars crosses diamonds shape shapes "
    "small medium large something"
).split()

CLIP_SPECIALS = ["<|startoftext|>", "<|endoftext|>"]
LLM_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class TinyModelPaths:
    """Where build_tiny_models saved each model directory."""

    clip: Path
    llm: Path


def _corpus() -> list[str]:
    words = VOCABULARY
    # The vicuna_v1 system prompt and roles, so the template's text compresses well.
    lines = [SYSTEM_PROMPT, "USER: ASSISTANT:"]
    # Deterministic word n-grams so frequent pairs become merges.
    for i in range(len(words)):
        lines.append(" ".join(words[(i * k) % len(words)] for k in range(1, 12)))
    return lines * 4


def _train_bpe(specials: list[str], vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return tokenizer


def build_clip_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with CLIP's start/end tokens added around every text, 77 tokens max."""
    tokenizer = _train_bpe(CLIP_SPECIALS, vocab_size=800)
    bos, eos = CLIP_SPECIALS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, tokenizer.token_to_id(bos)), (eos, tokenizer.token_to_id(eos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=eos, model_max_length=77
    )


def build_llm_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with Llama's specials; BOS is added by the conversation code, not here."""
    tokenizer = _train_bpe(LLM_SPECIALS, vocab_size=1000)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        model_max_length=2048,
    )


def tiny_clip_config(tokenizer: PreTrainedTokenizerFast, width: int = 64, depth: int = 3,
                     projection_dim: int = 32) -> CLIPConfig:
    """A CLIP config with ViT-L/14-336's geometry (336 px, patch 14: 576 patches), tiny width/depth."""
    return CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=depth,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            image_size=336,
            patch_size=14,
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=depth,
            num_attention_heads=2,
        ),
        projection_dim=projection_dim,
    )


def save_clip(model: CLIPModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> Path:
    """Weights, tokenizer and a CLIP image processor (CLIP's mean/std, 336 px), as a hub checkpoint."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_clip(out_dir: Path, width: int = 64, depth: int = 3, projection_dim: int = 32, seed: int = 0) -> Path:
    """A randomly initialised tiny CLIP (the trained one, models/tiny-clip, is what the demo uses)."""
    torch.manual_seed(seed)
    tokenizer = build_clip_tokenizer()
    model = CLIPModel(tiny_clip_config(tokenizer, width, depth, projection_dim))
    # Random-init projections are small; scale them so embeddings have CLIP-like norms (docs/method.md:
    # the released scoring's kept share depends on the norms).
    with torch.no_grad():
        model.visual_projection.weight.mul_(4.0)
        model.text_projection.weight.mul_(4.0)
    return save_clip(model, tokenizer, out_dir)


def build_tiny_llm(out_dir: Path, hidden: int = 64, depth: int = 2, seed: int = 0) -> Path:
    """A Llama-architecture causal LM small enough to train on a CPU in seconds."""
    torch.manual_seed(seed)
    tokenizer = build_llm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=depth,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_models(root: str | Path, trained_clip: bool = True) -> TinyModelPaths:
    """Build (once) the tiny CLIP and LLM under root/clip and root/llm. The CLIP is a copy of the
    project's trained one (models/tiny-clip) when `trained_clip` and it is there, else a random one.
    Idempotent: a directory whose build finished (marked by BUILD_DONE) is reused as it is."""
    root = Path(root)
    paths = TinyModelPaths(clip=root / "clip", llm=root / "llm")

    def copy_trained(out: Path) -> Path:
        shutil.copytree(shipped_clip(), out, dirs_exist_ok=True)
        return out

    use_trained = trained_clip and (SHIPPED_CLIP / "config.json").exists()
    for path, build in ((paths.clip, copy_trained if use_trained else build_tiny_clip), (paths.llm, build_tiny_llm)):
        marker = path / "BUILD_DONE"
        if marker.exists():
            continue
        path.mkdir(parents=True, exist_ok=True)
        build(path)
        marker.write_text(json.dumps({"builder": build.__name__}))
    return paths


SHIPPED_CLIP = Path(__file__).resolve().parent.parent / "models" / "tiny-clip"
"""The tiny CLIP trained by the project (jobs/train_clip.py; its model card is README.md there)."""


def shipped_clip() -> Path:
    """The path of the project's trained tiny CLIP, checked to be there."""
    if not (SHIPPED_CLIP / "config.json").exists():
        raise FileNotFoundError(f"{SHIPPED_CLIP}: the trained tiny CLIP is missing (python jobs/train_clip.py)")
    return SHIPPED_CLIP
