"""What every section shares: the sizes of a run, its log and results, the LLMs it builds."""

from __future__ import annotations

import gc
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLM_GEOMETRY = {
    "7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
    "13b": dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824),
}
TINY_LLM_GEOMETRY = {
    "7b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
    "13b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192),
}



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
        self.only_sections: set[str] = set()
        self.engine_layers = 4

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
        if name in self.skip_sections or (self.only_sections and name not in self.only_sections):
            self.results["skipped"][name] = "--skip" if name in self.skip_sections else "--only"
            self.log(f"== {name}: skipped ({self.results['skipped'][name]})")
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
