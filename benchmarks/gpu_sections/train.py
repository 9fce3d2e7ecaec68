"""The training step, full vs TRIM, padded vs packed (issue 14)."""

from __future__ import annotations

import traceback

import numpy as np
import torch

from gpu_sections.run import Run, build_llm, free_memory
from trim.batching import pack_batch, pad_batch, spliced_length
from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from trim.model import LlavaTrim, build_projector


def make_samples(run: Run, k_per_sample: list[int], rng: np.random.Generator) -> list[dict]:
    """Micro-batch samples: BOS, the image placeholder, random text; the last 60% supervised."""
    lo, hi = run.sizes.text
    samples = []
    for k in k_per_sample:
        n = int(rng.integers(lo, hi + 1))
        ids = [1, IMAGE_TOKEN_INDEX] + rng.integers(3, run.sizes.vocab, n - 2).tolist()
        labels = [IGNORE_INDEX] * int(n * 0.4) + ids[int(n * 0.4):]
        samples.append({"input_ids": ids, "labels": labels, "visual": torch.randn(k, 1024, dtype=torch.float16)})
    return samples


def train_case(run: Run, model: LlavaTrim, samples: list[dict], name: str, packed: bool) -> float:
    batch = pack_batch(samples, run.sizes.pack_length, 0) if packed else pad_batch(samples, 0)
    with torch.no_grad():
        slots = model.embed(batch).attention_mask.numel()
    real = sum(spliced_length(s) for s in samples)

    losses = []

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss = model(batch)
        loss.backward()
        losses.append(loss.detach())

    cuda = run.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    seconds = run.timed(step)
    kind = "packed" if packed else "padded"
    values = {f"train_step_{name}_{kind}_s": seconds, f"train_rows_{name}_{kind}": int(batch.input_ids.shape[0]),
              f"padding_share_{name}_{kind}": 1 - real / slots, f"train_loss_{name}_{kind}": float(losses[-1])}
    if cuda:
        values[f"train_peak_gib_{name}_{kind}"] = torch.cuda.max_memory_allocated() / 2**30
    run.put(**values)
    model.zero_grad(set_to_none=True)
    return seconds


def train_section(run: Run) -> None:
    sizes = run.sizes
    llm = run.models.get("7b") or build_llm(run, "7b")
    run.models["7b"] = llm
    model = LlavaTrim(llm, build_projector(1024, llm.config.hidden_size).to(run.device, run.dtype),
                      {"feature_dim": 1024})
    model.enable_gradient_checkpointing()
    model.train()
    rng = np.random.default_rng(0)
    trim_k = rng.integers(sizes.trim_k // 2, sizes.trim_k * 3 // 2 + 1, sizes.micro).tolist()
    samples = make_samples(run, trim_k, rng)
    cases = {"trim": samples, "full": [{**s, "visual": torch.randn(sizes.full_k, 1024, dtype=torch.float16)}
                                       for s in samples]}
    real = {name: sum(spliced_length(s) for s in group) for name, group in cases.items()}
    run.put(train_tokens_full=real["full"], train_tokens_trim=real["trim"], token_ratio=real["full"] / real["trim"],
            train_micro_batch=sizes.micro, trim_visual_tokens_mean=float(np.mean(trim_k)))
    times = {}
    for name in ("full", "trim"):
        times[f"{name}_padded"] = train_case(run, model, cases[name], name, packed=False)
    for attn in run.results["packed_attn_tried"]:
        try:
            llm.set_attn_implementation(attn)
            for name in ("full", "trim"):
                times[f"{name}_packed"] = train_case(run, model, cases[name], name, packed=True)
            run.put(packed_attn=attn)
            break
        except Exception as error:
            traceback.print_exc()
            run.results["errors"][f"train_packed_{attn}"] = f"{type(error).__name__}: {error}"[:500]
            run.log(f"  packed with {attn} failed: {type(error).__name__}; trying the next")
            model.zero_grad(set_to_none=True)
            free_memory(run)
    llm.set_attn_implementation("sdpa")
    ratio = real["full"] / real["trim"]
    values = {"step_ratio_padded": times["full_padded"] / times["trim_padded"]}
    for name in ("full", "trim"):  # packing must not change the loss (bf16 noise aside)
        padded, packed = run.results.get(f"train_loss_{name}_padded"), run.results.get(f"train_loss_{name}_packed")
        if padded is not None and packed is not None:
            values[f"packed_loss_rel_diff_{name}"] = abs(packed - padded) / abs(padded)
    if "trim_packed" in times:
        values["step_ratio_packed"] = times["full_packed"] / times["trim_packed"]
        values["step_ratio_trim_packed_over_full_padded"] = times["full_padded"] / times["trim_packed"]
        values["packed_over_token_ratio"] = values["step_ratio_packed"] / ratio
        values["packed_step_ratio_over_token_ratio"] = values["packed_over_token_ratio"]
    run.put(**values)
    llm.requires_grad_(False)
    llm.eval()
