"""What the engine section trains from, made on the device: the LLM checkpoint (the tiny Llama, or a
Llama at vicuna-7B's layer shapes with fewer layers) and two small caches of the same samples, TRIM's
and the full one (selection "all"), written by precompute's own code without Ray: the CPU stage's
`prepare_unit`, the encoder actor's `encode_unit`, the cache writer's `part_table`/`write_part`, the
driver's `summarize`, manifest and `publish`."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from gpu_sections.run import LLM_GEOMETRY, Run
from trim import TrimConfig

CLIP_LAYER = -2
"""LLaVA-1.5's feature layer."""


def write_llm(run: Run, folder: Path, layers: int) -> str:
    """The starting checkpoint, written here: the tiny Llama (--tiny), else a Llama of vicuna-7B's layer
    shapes (hidden 4096, 32 heads, MLP 11008, vocab 32000) with `layers` layers, random bf16 weights
    built on the device. The tokenizer is the tiny one (its ids are a subset of the vocabulary)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from synthetic.tiny_models import build_llm_tokenizer, build_tiny_llm

    if run.tiny:
        return str(build_tiny_llm(folder))
    tokenizer = build_llm_tokenizer()
    config = LlamaConfig(vocab_size=32000, num_key_value_heads=LLM_GEOMETRY["7b"]["num_attention_heads"],
                         max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, **{**LLM_GEOMETRY["7b"], "num_hidden_layers": layers})
    torch.manual_seed(0)
    with torch.device(run.device):
        llm = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    llm.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    run.log(f"  wrote a {sum(p.numel() for p in llm.parameters()) / 1e9:.2f}B-parameter Llama ({layers} layers)")
    del llm
    return str(folder)


def image_samples(root: Path, count: int) -> tuple[list[dict], list[bytes]]:
    """`count` samples with an image each, from the synthetic LLaVA mixture (one image per sample), as
    precompute's units hold them: the sample's fields, its image's row, no IQR group."""
    from synthetic.mixture import write_mixture

    mixture = write_mixture(root, num_samples=count * 4, num_images=count * 2, seed=0)
    records = [r for r in json.loads(mixture.read_text()) if "image" in r][:count]
    if len(records) < count:
        raise RuntimeError(f"the synthetic mixture has {len(records)} samples with an image, {count} wanted")
    samples = [{"id": r["id"], "source": r["id"].rsplit("-", 1)[0], "index": i, "image_key": r["image"],
                "conversations": json.dumps(r["conversations"]), "image": i, "group": -1}
               for i, r in enumerate(records)]
    return samples, [(root / "images" / r["image"]).read_bytes() for r in records]


def write_cache(root: Path, encoder, samples: list[dict], images: list[bytes], trim_cfg: TrimConfig) -> str:
    """One cache version of `samples` under root (as precompute's driver lays it out: identity first,
    the part, the manifest last, CURRENT.json); returns its version folder."""
    from pipelines.cache_format import part_table, write_part
    from pipelines.manifests import publish, start_version, version_of
    from pipelines.precompute.encode import encode_unit
    from pipelines.precompute.prepare import decode_unit, prepare_unit
    from pipelines.precompute.stage import LAYOUT_VERSION, summarize

    started = time.time()
    info = encoder.describe()
    identity = {"encoder": info, "trim": trim_cfg.to_dict(), "layout": {"version": LAYOUT_VERSION},
                "samples": [s["id"] for s in samples]}
    folder = start_version(str(root), identity)
    prepared = prepare_unit(encoder.host, samples, images, trim_cfg.text, grouped=False)
    unit_samples, unit = decode_unit({"samples": json.dumps(samples), **prepared}, trim_cfg.seed)
    reduced = encode_unit(encoder.towers, unit, trim_cfg, batch_size=len(images))
    write_part(folder, "part-e00000.parquet", part_table(unit_samples, reduced, encoder.feature_dim))
    manifest = summarize(folder, identity_info=info, trim_cfg=trim_cfg, seconds=time.time() - started)
    manifest.identity, manifest.version = identity, version_of(identity)
    manifest.write(folder)
    publish(str(root), manifest.version, keep=1)
    return folder


def write_caches(run: Run, root: Path, clip: str, count: int, trim_cfg: TrimConfig) -> dict[str, str]:
    """{"full": folder, "trim": folder}: the same `count` image samples cached in full and by TRIM."""
    from trim.encoders import ClipEncoder

    samples, images = image_samples(root / "data", count)
    encoder = ClipEncoder(clip, layer=CLIP_LAYER, device=run.device.type, dtype=run.dtype)
    caches = {name: write_cache(root / f"cache-{name}", encoder, samples, images, cfg)
              for name, cfg in (("full", dataclasses.replace(trim_cfg, selection="all")), ("trim", trim_cfg))}
    del encoder
    return caches
