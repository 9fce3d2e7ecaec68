"""One GPU check for issues 14 (fine-tuning), 15 (inference) and 16 (precompute), printed as ratios.

    python benchmarks/gpu_check.py [--tiny] [--out DIR] [--geometries 7b,13b] [--deadline-s 240]

Needs only torch, transformers, numpy, PIL (torchvision optional) and `trim/`: random weights at
vicuna-7B/13B and CLIP ViT-L/14-336 geometry, bf16, built on the device. `--tiny` runs the same code
at tiny sizes (CPU, under a minute). Each section is guarded: a failure is printed and recorded, the
others still run. The last line is `RESULT {json}`. docs/gpu.md says what each figure means.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import transformers  # noqa: E402
from transformers import CLIPConfig, CLIPModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from trim import TrimConfig, trim_tokens  # noqa: E402
from trim.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from trim.model import LlavaTrim, build_projector, pack_batch, pad_batch, spliced_length  # noqa: E402

LLM_GEOMETRY = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
}
TINY_LLM_GEOMETRY = {
    "7b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "13b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_RGB = tuple(int(x * 255) for x in CLIP_MEAN)  # LLaVA's expand2square colour: (122, 116, 104)
IMAGE_SIDE = 336


@dataclass(frozen=True)
class Sizes:
    """The workload of one run (GPU default or --tiny)."""

    vocab: int
    """LLM vocabulary."""
    micro: int
    """Samples per training micro-batch."""
    text: tuple[int, int]
    """Text tokens per sample (placeholder included), drawn uniformly in [lo, hi]."""
    full_k: int
    """Visual tokens per image without TRIM."""
    trim_k: int
    """Mean visual tokens per image with TRIM (drawn in [k/2, 3k/2])."""
    pack_length: int
    """Spliced positions per packed row."""
    warmup: int
    """Untimed runs before each measurement."""
    repeats: int
    """Timed runs (the median is reported)."""
    prompt: int
    """Text tokens of an inference prompt."""
    prefill_batch: int
    """Prompts in the batched prefill."""
    decode_steps: int
    """Greedy steps timed for decode."""
    encoder_batch: int
    """Images per encoder batch."""
    preprocess_images: int
    """JPEGs preprocessed on one CPU core."""
    quick_repeats: int
    """Timed runs of the short measurements (batch-1 prefill, graph replay)."""
    answer_tokens: int
    """Tokens generated per evaluation answer (a short VQA answer and its eos)."""


GPU_SIZES = Sizes(32000, 16, (48, 256), 576, 122, 4096, 1, 3, 75, 16, 16, 256, 64, 10, 4)
TINY_SIZES = Sizes(1000, 3, (48, 128), 576, 122, 1024, 0, 1, 75, 2, 2, 2, 4, 1, 4)


class Run:
    """Results, errors and a timestamped log shared by the sections."""

    def __init__(self, device: torch.device, sizes: Sizes, tiny: bool, deadline_s: float, out: Path | None):
        self.device, self.sizes, self.tiny, self.deadline_s, self.out = device, sizes, tiny, deadline_s, out
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.start = time.perf_counter()
        self.results: dict = {"errors": {}, "skipped": {}}
        self.lines: list[str] = []
        self.models: dict = {}
        self.skip_sections: set[str] = set()

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f}s] {message}"
        self.lines.append(line)
        print(line, flush=True)

    def put(self, **values) -> None:
        for key, value in values.items():
            self.results[key] = float(f"{value:.6g}") if isinstance(value, float) else value
        self.log("  " + ", ".join(f"{k}={self.results[k]}" for k in values))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], object], warmup: int | None = None, repeats: int | None = None) -> float:
        """Median wall seconds of fn over `repeats` runs after `warmup` untimed ones."""
        for _ in range(self.sizes.warmup if warmup is None else warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.sizes.repeats if repeats is None else repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def section(self, name: str, fn: Callable[[Run], None], optional: bool = False) -> None:
        elapsed = time.perf_counter() - self.start
        if name in self.skip_sections:
            self.results["skipped"][name] = "--skip"
            self.log(f"== {name}: skipped (--skip)")
            return
        if optional and elapsed > self.deadline_s:
            self.results["skipped"][name] = f"deadline: {elapsed:.0f}s > {self.deadline_s:.0f}s"
            self.log(f"== {name}: skipped ({self.results['skipped'][name]})")
            return
        self.log(f"== {name}")
        try:
            fn(self)
        except Exception as error:  # one failing section must not lose the others
            traceback.print_exc()
            sys.stdout.flush()
            self.results["errors"][name] = f"{type(error).__name__}: {error}"[:500]
            self.log(f"== {name}: FAILED {self.results['errors'][name]}")
        finally:
            free_memory(self)
            self.save()

    def save(self, line: str | None = None) -> None:
        """result.json and log.txt under --out, after every section (a run cut short keeps its figures)."""
        if self.out is None:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "result.json").write_text(json.dumps(self.results, indent=2, sort_keys=True))
        (self.out / "log.txt").write_text("\n".join(self.lines + ([line] if line else [])) + "\n")

    def skip(self, name: str, reason: str) -> None:
        self.results["skipped"][name] = reason
        self.log(f"  {name} skipped: {reason}")


def free_memory(run: Run) -> None:
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def build_llm(run: Run, geometry: str, attn: str = "sdpa") -> LlamaForCausalLM:
    """A Llama with random weights, built directly on the device in the run's dtype."""
    shape = (TINY_LLM_GEOMETRY if run.tiny else LLM_GEOMETRY)[geometry]
    config = LlamaConfig(vocab_size=run.sizes.vocab, num_key_value_heads=shape["num_attention_heads"],
                         max_position_embeddings=8192, **shape)
    with torch.device(run.device):
        llm = LlamaForCausalLM._from_config(config, attn_implementation=attn, dtype=run.dtype)
    run.log(f"  built {geometry} LLM: {sum(p.numel() for p in llm.parameters()) / 1e9:.2f}B params, {run.dtype}")
    return llm


# Training step (issue 14) ---------------------------------------------------------------------


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


# Prefill, decode and KV cache (issue 15) --------------------------------------------------------


def cache_bytes(cache) -> int:
    """Bytes held by a transformers cache's key and value tensors (5.x `layers`, or older lists)."""
    layers = getattr(cache, "layers", None)
    if layers is not None:
        tensors = [t for layer in layers for t in (layer.keys, layer.values) if t is not None]
    else:
        tensors = list(cache.key_cache) + list(cache.value_cache)
    return sum(t.numel() * t.element_size() for t in tensors)


def prefill_case(run: Run, llm: LlamaForCausalLM, tokens: int, decode: bool) -> dict:
    hidden = llm.config.hidden_size
    with torch.no_grad():
        out = {}
        for key, rows in (("b1", 1), ("b16", run.sizes.prefill_batch)):
            embeds = torch.randn(rows, tokens, hidden, device=run.device, dtype=run.dtype) * 0.02
            repeats = run.sizes.quick_repeats if rows == 1 else None
            out[key] = run.timed(lambda: llm(inputs_embeds=embeds, use_cache=False, logits_to_keep=1),  # noqa: B023
                                 repeats=repeats)
        one = embeds[:1]
        config = llm.config
        head_dim = config.hidden_size // config.num_attention_heads
        element = torch.finfo(run.dtype).bits // 8
        out["kv_analytic"] = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * tokens * element
        if decode:
            first = llm(inputs_embeds=one, use_cache=True, logits_to_keep=1)
            cache = first.past_key_values
            out["kv_measured"] = cache_bytes(cache)
            token = first.logits[:, -1].argmax(dim=-1, keepdim=True)
            steps = []
            for _ in range(run.sizes.decode_steps + 1):
                run.sync()
                start = time.perf_counter()
                token = llm(input_ids=token, past_key_values=cache, use_cache=True,
                            logits_to_keep=1).logits[:, -1].argmax(dim=-1, keepdim=True)
                run.sync()
                steps.append(time.perf_counter() - start)
            out["decode_ms"] = 1000 * statistics.median(steps[1:])
    return out


def prefill_section(run: Run, geometry: str) -> None:
    llm = run.models.get(geometry) or build_llm(run, geometry)
    run.models[geometry] = llm.eval()
    llm.zero_grad(set_to_none=True)  # whatever a failed training step left
    suffix = "" if geometry == "7b" else f"_{geometry}"
    decode = geometry == "7b"
    sizes = run.sizes
    full = prefill_case(run, llm, sizes.full_k + sizes.prompt, decode)
    trim = prefill_case(run, llm, sizes.trim_k + sizes.prompt, decode)
    values = {f"ttft_b1_eager_full_s{suffix}": full["b1"], f"ttft_b1_eager_trim_s{suffix}": trim["b1"],
              f"ttft_b1_eager_ratio{suffix}": full["b1"] / trim["b1"],
              f"prefill_b16_full_s{suffix}": full["b16"], f"prefill_b16_trim_s{suffix}": trim["b16"],
              f"prefill_b16_ratio{suffix}": full["b16"] / trim["b16"], f"prefill_batch{suffix}": sizes.prefill_batch,
              f"kv_bytes_full{suffix}": full["kv_analytic"], f"kv_bytes_trim{suffix}": trim["kv_analytic"]}
    if decode:
        values.update(decode_ms_per_token_full=full["decode_ms"], decode_ms_per_token_trim=trim["decode_ms"],
                      kv_bytes_measured_full=full["kv_measured"], kv_bytes_measured_trim=trim["kv_measured"])
    run.put(**values)


def plain_prefill(llm: LlamaForCausalLM, embeds: torch.Tensor) -> torch.Tensor:
    """Last-position logits of the Llama forward with no mask at all (sdpa's is_causal path), as a CUDA
    graph can capture it: under stream capture transformers' mask builder cannot read tensor values,
    so it would materialize a causal mask and sdpa would leave its flash kernel."""
    model = llm.model
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    rotary = model.rotary_emb(embeds, positions)
    hidden = embeds
    for layer in model.layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
    return llm.lm_head(model.norm(hidden[:, -1:]))


def eager_greedy(llm: LlamaForCausalLM, embeds: torch.Tensor, tokens: int) -> list[int]:
    """Greedy tokens after a prompt, eager, DynamicCache (what the low-latency path must reproduce)."""
    out = llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
    generated = [out.logits[:, -1].argmax(dim=-1, keepdim=True)]
    for _ in range(tokens - 1):
        out = llm(input_ids=generated[-1], past_key_values=out.past_key_values, use_cache=True, logits_to_keep=1)
        generated.append(out.logits[:, -1].argmax(dim=-1, keepdim=True))
    return torch.cat(generated).flatten().tolist()


def lowlatency_case(run: Run, llm: LlamaForCausalLM, suffix: str) -> None:
    """Batch 1 on the project's low-latency path (trim.low_latency: static KV cache, prompt left-padded
    to its bucket, prefill and decode replayed from CUDA graphs on CUDA; the same code without graphs
    on the CPU): time to first token (embeddings in, first token on the host), decode ms/token, and
    whether its greedy tokens are the eager ones (bf16 noise can flip a near tie of random weights)."""
    from trim.low_latency import LowLatencyGenerator

    sizes = run.sizes
    lengths = {"full": sizes.full_k + sizes.prompt, "trim": sizes.trim_k + sizes.prompt}
    generator = LowLatencyGenerator(llm, max_new_tokens=sizes.decode_steps + 1,
                                    max_prompt_tokens=max(lengths.values()))
    values: dict = {f"lowlatency_graphs{suffix}": generator.use_graphs}
    with torch.no_grad():
        for name, tokens in lengths.items():
            embeds = torch.randn(1, tokens, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
            generator.prefill(embeds)  # captures this bucket's graph (and the decode graph) on CUDA
            ttft = run.timed(lambda: generator.prefill(embeds), repeats=sizes.quick_repeats)  # noqa: B023
            generated = [generator.prefill(embeds)]
            steps = []
            for _ in range(sizes.decode_steps):
                start = time.perf_counter()
                generated.append(generator.step())  # reads the token back: synchronised
                steps.append(time.perf_counter() - start)
            values.update({f"ttft_b1_lowlatency_{name}_s{suffix}": ttft,
                           f"decode_ms_per_token_lowlatency_{name}{suffix}": 1000 * statistics.median(steps),
                           f"lowlatency_bucket_{name}{suffix}": generator.bucket_for(tokens),
                           f"lowlatency_tokens_match_eager_{name}{suffix}":
                               generated == eager_greedy(llm, embeds, len(generated))})
    values[f"ttft_b1_lowlatency_ratio{suffix}"] = (values[f"ttft_b1_lowlatency_full_s{suffix}"]
                                                  / values[f"ttft_b1_lowlatency_trim_s{suffix}"])
    run.put(**values)


def graph_section(run: Run, geometry: str) -> None:
    """Batch-1 prefill on the low-latency path (any device), then replayed from a captured CUDA graph
    (static input buffer, no cache)."""
    suffix = "" if geometry == "7b" else f"_{geometry}"
    llm = run.models.get(geometry) or build_llm(run, geometry)
    run.models[geometry] = llm.eval()
    with torch.no_grad():
        check = torch.randn(1, 9, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
        expected = llm(inputs_embeds=check, use_cache=False, logits_to_keep=1).logits
        diff = float((plain_prefill(llm, check).float() - expected.float()).abs().max())
    run.put(**{f"graph_plain_forward_max_diff{suffix}": diff})
    lowlatency_case(run, llm, suffix)
    if run.device.type != "cuda":
        run.skip(f"graph_{geometry}", "CUDA graphs need a CUDA device")
        return
    times = {}
    for name, k in (("full", run.sizes.full_k), ("trim", run.sizes.trim_k)):
        with torch.no_grad():
            static = torch.randn(1, k + run.sizes.prompt, llm.config.hidden_size, device=run.device,
                                 dtype=run.dtype) * 0.02
            eager = llm(inputs_embeds=static, use_cache=False, logits_to_keep=1).logits
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):
                    plain_prefill(llm, static)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                captured = plain_prefill(llm, static)
            graph.replay()
            torch.cuda.synchronize()
            diff = float((captured.float() - eager.float()).abs().max())
            times[name] = run.timed(graph.replay, repeats=run.sizes.quick_repeats)
            run.put(**{f"ttft_b1_graph_{name}_s{suffix}": times[name], f"graph_vs_eager_max_diff_{name}{suffix}": diff})
            del graph, captured, eager, static
    run.put(**{f"ttft_b1_graph_ratio{suffix}": times["full"] / times["trim"]})


def eval_section(run: Run) -> None:
    """Evaluation throughput (issue 15): one batch of prefill_batch questions as the evaluation actor
    runs it on the device, full vs TRIM. Encode, as the answerer's reduce (trim.inference): 8-bit
    pixels normalized on the device, the vision tower to layer -2, the text tower, trim_tokens with
    fp32 scoring (full: selection "all", as the evaluation's full-token rows). Answer: answer_tokens
    greedy tokens per question, through transformers' eager generate and through the batched
    low-latency path (trim.low_latency, what evaluation uses on CUDA). Not in it, as not in the
    evaluation actor's time: the image decoding, resizing and tokenizing, which the evaluation job
    runs in CPU tasks beside the actors (pipelines/eval_inputs.py); nor the projector (a 2-layer MLP)."""
    from trim.encoders import ClipTowers
    from trim.low_latency import LowLatencyGenerator

    free_memory(run)  # the batch-1 generator's cache and graphs
    sizes, batch, answer = run.sizes, run.sizes.prefill_batch, run.sizes.answer_tokens
    llm = run.models.get("7b") or build_llm(run, "7b")
    run.models["7b"] = llm.eval()
    clip = build_clip(run)
    towers = ClipTowers(clip, -2, CLIP_MEAN, CLIP_STD)
    generator = torch.Generator().manual_seed(1)
    levels = torch.randint(0, 256, (batch, 3, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8, generator=generator)
    text_ids = torch.randint(0, clip.config.text_config.vocab_size - 1, (batch, 77), generator=generator)
    text_ids[:, -1] = clip.config.text_config.eos_token_id
    configs = {"full": TrimConfig(selection="all", score_dtype="float32"), "trim": TrimConfig(score_dtype="float32")}

    def reduce(cfg: TrimConfig) -> int:
        encoded = towers.encode_levels(levels)
        return sum(t.shape[0] for t in trim_tokens(encoded.features, encoded.patch_embeds,
                                                   towers.encode_tokens(text_ids), cfg).tokens)

    lengths = {"full": sizes.full_k + sizes.prompt, "trim": sizes.trim_k + sizes.prompt}
    fast = LowLatencyGenerator(llm, max_new_tokens=answer, max_prompt_tokens=max(lengths.values()), batch_size=batch)
    values: dict = {"eval_batch": batch, "eval_answer_tokens": answer}
    with torch.no_grad():
        for name, tokens in lengths.items():
            encode_s = run.timed(lambda: reduce(configs[name]))  # noqa: B023 (the count syncs)
            prompts = [torch.randn(tokens, llm.config.hidden_size, device=run.device, dtype=run.dtype) * 0.02
                       for _ in range(batch)]
            stacked = torch.stack(prompts)
            ones = torch.ones(stacked.shape[:2], dtype=torch.long, device=run.device)
            eager_s = run.timed(lambda: llm.generate(inputs_embeds=stacked, attention_mask=ones,  # noqa: B023
                                                     max_new_tokens=answer, min_new_tokens=answer, do_sample=False,
                                                     pad_token_id=0))
            fast_s = run.timed(lambda: fast.generate_batch(prompts, answer, eos_token_id=-1))  # noqa: B023
            first_s = run.timed(lambda: fast.prefill_batch(prompts))  # noqa: B023
            values.update({f"eval_b{batch}_encode_{name}_s": encode_s, f"eval_b{batch}_answer_eager_{name}_s": eager_s,
                           f"eval_b{batch}_answer_lowlatency_{name}_s": fast_s,
                           f"eval_b{batch}_first_token_lowlatency_{name}_s": first_s,
                           f"eval_questions_per_s_eager_{name}": batch / (encode_s + eager_s),
                           f"eval_questions_per_s_{name}": batch / (encode_s + fast_s)})
    values["eval_questions_per_s_ratio"] = values["eval_questions_per_s_trim"] / values["eval_questions_per_s_full"]
    values["eval_questions_per_s_ratio_eager"] = (values["eval_questions_per_s_eager_trim"]
                                                  / values["eval_questions_per_s_eager_full"])
    values["eval_lowlatency_graphs"] = fast.use_graphs
    run.put(**values)


# Encoder stage and preprocessing (issue 16) -----------------------------------------------------


def build_clip(run: Run) -> CLIPModel:
    if run.tiny:
        vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2)
        text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)
        projection = 32
    else:  # ViT-L/14-336
        vision = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        projection = 768
    config = CLIPConfig(text_config=text, vision_config={**vision, "image_size": IMAGE_SIDE, "patch_size": 14},
                        projection_dim=projection)
    with torch.device(run.device):
        return CLIPModel._from_config(config, attn_implementation="sdpa", dtype=run.dtype).eval()


def vision_until(clip: CLIPModel, pixels: torch.Tensor, layer: int) -> torch.Tensor:
    """hidden_states[layer] of the vision tower (CLS dropped), running only the encoder layers it
    needs: the project's own function (trim.encoders.vision_features), as precompute runs it."""
    from trim.encoders import vision_features

    return vision_features(clip, pixels, layer).features


def encoder_stage(towers, unit) -> list[int]:
    """8-bit pixels on the host to cache rows' arrays on the host: precompute's encoder-actor code
    (pipelines.precompute_encode.encode_unit: normalize on the device, vision tower to layer -2,
    projection, text tower, TRIM on the device, one pinned copy back). Returns tokens per image."""
    from pipelines.precompute_encode import encode_unit

    reduced = encode_unit(towers, unit, TrimConfig(), batch_size=len(unit.image_of_sample))
    return reduced.num_tokens.tolist()


def encoder_section(run: Run) -> None:
    from pipelines.precompute_encode import UnitArrays
    from trim.encoders import ClipTowers

    clip = build_clip(run)
    towers = ClipTowers(clip, -2, CLIP_MEAN, CLIP_STD)
    batch = run.sizes.encoder_batch
    generator = torch.Generator().manual_seed(0)
    levels = torch.randint(0, 256, (batch, 3, IMAGE_SIDE, IMAGE_SIDE), dtype=torch.uint8, generator=generator)
    vocab = clip.config.text_config.vocab_size
    text_ids = torch.randint(0, vocab - 1, (batch, 77), generator=generator)
    text_ids[:, -1] = clip.config.text_config.eos_token_id
    # What the CPU stage hands the encoder actor: host arrays, one image per sample here.
    unit = UnitArrays(pixels=levels.numpy(), image_of_sample=np.arange(batch), input_ids=text_ids.numpy(),
                      attention_mask=np.ones((batch, 77), dtype=np.int64), seeds=np.arange(batch))
    with torch.inference_mode():
        pixels = towers.normalize(levels)
        full = clip.vision_model(pixel_values=pixels, output_hidden_states=True)
        layer_diff = float((vision_until(clip, pixels, -2) - full.hidden_states[-2][:, 1:]).abs().max())
        del full
        raw = run.timed(lambda: clip.vision_model(pixel_values=pixels).last_hidden_state)
        counts = encoder_stage(towers, unit)
        stage = run.timed(lambda: encoder_stage(towers, unit))
        # The same tokens as trim_tokens called directly on the towers' outputs.
        encoded = towers.encode_levels(levels)
        direct = trim_tokens(encoded.features, encoded.patch_embeds, towers.encode_tokens(text_ids), TrimConfig())
    run.put(encoder_batch=batch, encoder_raw_images_per_s=batch / raw, encoder_stage_images_per_s=batch / stage,
            encoder_stage_over_raw=raw / stage, encoder_stage_tokens_per_image=float(np.mean(counts)),
            encoder_trim_device=run.device.type, encoder_truncated_vs_hidden_states_max_diff=layer_diff,
            encoder_stage_matches_trim_tokens=counts == direct.num_tokens)


def make_jpeg(seed: int = 0) -> bytes:
    """A 640x480 JPEG with smooth content (upsampled noise), quality 90."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8))
    image = small.resize((640, 480), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pil_preprocess(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """LLaVA's CPU path: decode, pad to square with the mean colour, resize 336 bicubic, normalize.
    Returns (uint8 HWC after resize, normalized float32 CHW)."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    side = max(image.size)
    canvas = Image.new("RGB", (side, side), PAD_RGB)
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    resized = np.array(canvas.resize((IMAGE_SIDE, IMAGE_SIDE), Image.BICUBIC))
    pixels = (resized.astype(np.float32) / 255.0 - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return resized, pixels.transpose(2, 0, 1)


def tensor_preprocess(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same on decoded uint8 [B, 3, H, W] tensors (one size) on any device: (uint8, normalized)."""
    batch, _, height, width = images.shape
    side = max(height, width)
    fill = torch.tensor(PAD_RGB, dtype=torch.uint8, device=images.device).view(1, 3, 1, 1)
    canvas = fill.expand(batch, 3, side, side).clone()
    top, left = (side - height) // 2, (side - width) // 2
    canvas[:, :, top:top + height, left:left + width] = images
    resized = F.interpolate(canvas.float(), size=(IMAGE_SIDE, IMAGE_SIDE), mode="bicubic", antialias=True,
                            align_corners=False).round_().clamp_(0, 255)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return resized.to(torch.uint8), (resized / 255.0 - mean) / std


def preprocess_section(run: Run) -> None:
    data = make_jpeg()
    count = run.sizes.preprocess_images
    pil_preprocess(data)
    start = time.perf_counter()
    for _ in range(count):
        pil_preprocess(data)
    run.put(cpu_preprocess_images_per_s_per_core=count / (time.perf_counter() - start))
    # The tensor path on PIL-decoded pixels, on the CPU: checks pad + resize + normalize alone.
    reference, _ = pil_preprocess(data)
    decoded = torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    resized, _ = tensor_preprocess(decoded[None])
    diff = (resized[0].permute(1, 2, 0).int() - torch.from_numpy(reference).int()).abs()
    run.put(tensor_resize_max_abs_diff=int(diff.max()), tensor_resize_mean_abs_diff=float(diff.float().mean()))


def gpu_decode_section(run: Run) -> None:
    if run.device.type != "cuda":
        run.skip("gpu_decode", "needs a CUDA device")
        return
    try:
        from torchvision.io import decode_jpeg
    except ImportError as error:
        run.skip("gpu_decode", f"torchvision not importable: {error}")
        return
    data = make_jpeg()
    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for _ in range(run.sizes.encoder_batch)]

    def decode_batch() -> torch.Tensor:
        images = torch.stack(decode_jpeg(encoded, device="cuda"))
        return tensor_preprocess(images)[1]

    seconds = run.timed(decode_batch)
    reference, _ = pil_preprocess(data)
    resized, _ = tensor_preprocess(decode_jpeg(encoded[0], device="cuda")[None])
    diff = (resized[0].permute(1, 2, 0).int().cpu() - torch.from_numpy(reference).int()).abs()
    run.put(gpu_decode_images_per_s=len(encoded) / seconds, gpu_decode_max_abs_diff=int(diff.max()),
            gpu_decode_mean_abs_diff=float(diff.float().mean()))


# The run ----------------------------------------------------------------------------------------


def environment(run: Run) -> dict:
    try:
        import torchvision

        vision_version = torchvision.__version__
    except ImportError:
        vision_version = None
    name = torch.cuda.get_device_name() if run.device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "torch": torch.__version__, "transformers": transformers.__version__,
            "torchvision": vision_version, "cuda": torch.version.cuda, "dtype": str(run.dtype), "tiny": run.tiny}


def summary(results: dict) -> str:
    rows = [("train step full padded / TRIM padded", "step_ratio_padded"), ("token ratio full / TRIM", "token_ratio"),
            ("train step full packed / TRIM packed", "step_ratio_packed"),
            ("  ... over the token ratio", "packed_over_token_ratio"), ("packed attention", "packed_attn"),
            ("TTFT b1 eager full / TRIM", "ttft_b1_eager_ratio"), ("TTFT b1 graph full / TRIM", "ttft_b1_graph_ratio"),
            ("TTFT b1 low-latency full / TRIM", "ttft_b1_lowlatency_ratio"),
            ("prefill b16 full / TRIM", "prefill_b16_ratio"),
            ("eval questions/s b16 TRIM / full (low-latency)", "eval_questions_per_s_ratio"),
            ("eval questions/s b16 TRIM / full (eager)", "eval_questions_per_s_ratio_eager"),
            ("TTFT b1 eager 13B full / TRIM", "ttft_b1_eager_ratio_13b"),
            ("decode ms/token full", "decode_ms_per_token_full"), ("decode ms/token TRIM", "decode_ms_per_token_trim"),
            ("encoder raw images/s", "encoder_raw_images_per_s"),
            ("encoder stage images/s", "encoder_stage_images_per_s"),
            ("encoder stage / raw", "encoder_stage_over_raw"),
            ("CPU preprocess images/s/core", "cpu_preprocess_images_per_s_per_core"),
            ("GPU decode images/s", "gpu_decode_images_per_s"), ("GPU decode max abs diff", "gpu_decode_max_abs_diff")]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label.ljust(width)}  {results.get(key, '-')}" for label, key in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, under a minute)")
    parser.add_argument("--out", type=Path, help="directory for result.json and log.txt")
    parser.add_argument("--geometries", default="7b,13b", help="LLM geometries for prefill (7b always trains)")
    parser.add_argument("--packed-attn", default=None,
                        help="attention implementations to try for packed rows, in order "
                             "(default flex_attention,sdpa on CUDA, sdpa_packed on CPU: see trim/attention.py)")
    parser.add_argument("--deadline-s", type=float, default=240.0,
                        help="optional sections (graphs, 13B) are skipped once this many seconds have passed")
    parser.add_argument("--skip", default="", help="sections not to run, e.g. train_7b,prefill_13b (see the log's ==)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Run(device, TINY_SIZES if args.tiny else GPU_SIZES, args.tiny, args.deadline_s, args.out)
    run.skip_sections = set(filter(None, args.skip.split(",")))
    default_attn = "flex_attention,sdpa" if device.type == "cuda" else "sdpa_packed"
    run.results["packed_attn_tried"] = (args.packed_attn or default_attn).split(",")
    run.results.update(environment(run))
    run.log(f"gpu_check on {run.results['device']}: torch {torch.__version__}, transformers {transformers.__version__}")
    geometries = [g for g in args.geometries.split(",") if g]
    run.section("train_7b", train_section)
    run.section("prefill_7b", lambda r: prefill_section(r, "7b"))
    run.section("encoder", encoder_section)
    run.section("preprocess_cpu", preprocess_section)
    run.section("gpu_decode", gpu_decode_section)
    run.section("graph_7b", lambda r: graph_section(r, "7b"), optional=True)
    run.section("eval_7b", eval_section, optional=True)
    run.models.pop("7b", None)
    free_memory(run)
    for geometry in (g for g in geometries if g != "7b"):
        run.section(f"prefill_{geometry}", lambda r, g=geometry: prefill_section(r, g), optional=True)
        run.section(f"graph_{geometry}", lambda r, g=geometry: graph_section(r, g), optional=True)
        run.models.pop(geometry, None)
    run.results["total_s"] = round(time.perf_counter() - run.start, 1)
    run.log("summary:\n" + summary(run.results))
    line = "RESULT " + json.dumps(run.results, sort_keys=True)
    run.save(line)
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
