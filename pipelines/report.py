"""The efficiency report (the TRIM paper's Fig. 1 and Table 2): a batch of one, with and without TRIM.

Measured on the model at hand, on whatever device it runs on (a GPU in bf16, else the CPU in fp32),
named in the table's title: visual and prompt tokens, CLIP + TRIM time, the LLM's time to first token
(projector + prefill + first token) and the decode time per token, eager and on the low-latency path
(static KV cache; CUDA graphs on CUDA). Computed from the model config (trim/efficiency.py), and
labelled so: prefill FLOPs and KV-cache bytes, for the model at hand and for LLaVA-1.5-7B and 13B, so
the same report prints the figures of the published sizes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field

from pipelines.manifests import CacheManifest
from trim.efficiency import (
    LLAVA_15_7B,
    LLAVA_15_13B,
    LlmShape,
    efficiency_rows,
    format_table,
    kv_cache_bytes,
    prefill_flops,
)
from trim.formats import load_llava_trim
from trim.model_files import SETTINGS_FILE

logger = logging.getLogger(__name__)

PUBLISHED = (("LLaVA-1.5-7B", LLAVA_15_7B), ("LLaVA-1.5-13B", LLAVA_15_13B))
PAPER_KEPT_SHARE = 0.21
"""The share of patches TRIM keeps on LLaVA-1.5's benchmarks, as the paper reports it."""


PAPER_VISUAL_TOKENS = round(PAPER_KEPT_SHARE * 576) + 1
"""Visual tokens of the analytic TRIM rows: the paper's 21% of 576 patches, plus the aggregate (122)."""


@dataclass
class CacheShare:
    """The kept share measured in a cache, for the analytic rows labelled with it."""

    visual_tokens: int
    """Mean visual tokens per image in the cache (kept + aggregate), rounded."""
    encoder: str
    """The encoder that produced it (its path), named in the rows' label."""


def cache_share(cache_manifest: CacheManifest | None) -> CacheShare | None:
    """The cache's measured share, or None without a cache. It describes this cache's encoder (a tiny
    CLIP keeps a few percent), not LLaVA-1.5's: the 7B/13B rows use it only in rows labelled so."""
    if not cache_manifest or not cache_manifest.kept.mean_tokens:
        return None
    encoder = str(cache_manifest.encoder.get("path") or cache_manifest.encoder.get("name") or "unnamed encoder")
    return CacheShare(max(1, round(cache_manifest.kept.mean_tokens)), encoder)


@dataclass
class MeasuredRow:
    label: str
    visual_tokens: int
    prompt_tokens: int
    encode_ms: float
    prefill_ms: float
    ttft_ms: float
    decode_ms_per_token: float
    prefill_mflops: float
    kv_cache_kib: float
    ttft_ratio: float = 1.0
    flops_ratio: float = 1.0


_MEASURED_COLUMNS = (("", "label", "{}"), ("visual", "visual_tokens", "{:d}"), ("tokens", "prompt_tokens", "{:d}"),
                     ("CLIP+TRIM ms", "encode_ms", "{:.1f}"), ("prefill ms", "prefill_ms", "{:.1f}"),
                     ("TTFT ms", "ttft_ms", "{:.1f}"), ("decode ms/token", "decode_ms_per_token", "{:.2f}"),
                     ("prefill MFLOPs", "prefill_mflops", "{:.1f}"), ("KV cache KiB", "kv_cache_kib", "{:.1f}"),
                     ("TTFT x", "ttft_ratio", "{:.3f}"), ("FLOPs x", "flops_ratio", "{:.3f}"))


def measured_rows(runs, shape: LlmShape, bytes_per_element: int = 2) -> list[MeasuredRow]:
    """Rows "full" then "TRIM" from timed runs (trim.timing.TimedRun), with the analytic prefill
    FLOPs and KV cache of their actual prompt lengths."""
    by_label = {run.label: run for run in runs}
    rows = []
    for label in ("full", "TRIM"):
        run = by_label[label]
        rows.append(MeasuredRow(
            label=label, visual_tokens=run.visual_tokens, prompt_tokens=run.prompt_tokens,
            encode_ms=run.encode_s * 1e3, prefill_ms=run.prefill_s * 1e3, ttft_ms=run.ttft_s * 1e3,
            decode_ms_per_token=run.decode_s_per_token * 1e3,
            prefill_mflops=prefill_flops(shape, run.prompt_tokens) / 1e6,
            kv_cache_kib=kv_cache_bytes(shape, run.prompt_tokens, bytes_per_element) / 1024))
    full = rows[0]
    for row in rows:
        row.ttft_ratio = row.ttft_ms / full.ttft_ms if full.ttft_ms else math.nan
        row.flops_ratio = row.prefill_mflops / full.prefill_mflops if full.prefill_mflops else math.nan
    return rows


def format_rows(rows: list, columns=_MEASURED_COLUMNS) -> str:
    """A plain-text table, label column left-aligned, the others right-aligned."""
    cells = [[title for title, _, _ in columns]]
    cells += [[fmt.format(getattr(row, attr)) for _, attr, fmt in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join([line[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(line[1:], widths[1:])]).rstrip()
                     for line in cells)


@dataclass
class Report:
    """Every table of the report, as text, as columns (for MLflow) and as flat metrics."""

    sections: list[tuple[str, str]] = field(default_factory=list)
    tables: dict[str, dict[str, list]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return "\n\n".join(f"{title}\n{table}" for title, table in self.sections) + "\n"


def _columns(rows: list) -> dict[str, list]:
    names = list(vars(rows[0]))
    return {name: [getattr(row, name) for row in rows] for name in names}


def _key(name: str) -> str:
    return name.lower().replace(" ", "_")


def _measured_section(report: Report, model_name: str, runs, shape: LlmShape, question_tokens: int, device: str,
                      bytes_per_element: int, graphs: bool) -> None:
    """One measured table (eager runs, or low-latency ones) with its metrics."""
    measured = measured_rows(runs, shape, bytes_per_element)
    trim_run = next(run for run in runs if run.label == "TRIM")
    key = _key(model_name)
    path = "eager"
    if trim_run.low_latency:
        key += "/low_latency"
        path = "low-latency path: static KV cache, " + ("CUDA graphs" if graphs else "no graphs off CUDA")
    report.sections.append((
        f"{model_name} (measured on {device}, {path}; batch of one, {question_tokens}-token question, "
        f"{trim_run.new_tokens} new tokens; FLOPs and KV cache computed for the prompt as fed, template included)",
        format_rows(measured)))
    report.tables[key.replace("/", "_")] = _columns(measured)
    for row in measured:
        prefix = f"{key}/{row.label.lower()}"
        report.metrics.update({f"{prefix}/visual_tokens": row.visual_tokens, f"{prefix}/ttft_ms": row.ttft_ms,
                               f"{prefix}/prefill_ms": row.prefill_ms,
                               f"{prefix}/decode_ms_per_token": row.decode_ms_per_token,
                               f"{prefix}/prefill_mflops": row.prefill_mflops})
    report.metrics[f"{key}/ttft_ratio"] = measured[1].ttft_ratio


def build_report(model_name: str, runs, shape: LlmShape, question_tokens: int,
                 visual_trim: int = PAPER_VISUAL_TOKENS, system_tokens: int = 0,
                 measured_share: CacheShare | None = None, device: str = "this machine",
                 low_latency_runs=None, bytes_per_element: int = 2, graphs: bool = False) -> Report:
    """The measured tables of the model at hand on `device` (eager runs, and low_latency_runs when
    given; `graphs`: whether those replayed CUDA graphs; bytes_per_element: of its KV cache) and the
    analytic tables of LLaVA-1.5-7B and 13B (a prompt of visual + question + system_tokens tokens;
    576 visual tokens without TRIM, visual_trim with it: by default the paper's share). With
    measured_share, one more row per table at the share measured in this project's cache, labelled
    with its encoder."""
    report = Report()
    _measured_section(report, model_name, runs, shape, question_tokens, device, bytes_per_element, graphs)
    if low_latency_runs:
        _measured_section(report, model_name, low_latency_runs, shape, question_tokens, device, bytes_per_element,
                          graphs)
    for name, published in PUBLISHED:
        rows = efficiency_rows(published, question_tokens, visual_trim=visual_trim, system_tokens=system_tokens)
        if measured_share:
            cache_row = efficiency_rows(published, question_tokens, visual_trim=measured_share.visual_tokens,
                                        system_tokens=system_tokens)[1]
            rows.append(dataclasses.replace(cache_row, label="TRIM-cache"))
        template = f"{system_tokens} template tokens" if system_tokens else "template tokens not counted"
        note = (f"; TRIM-cache: the share measured in this cache with {measured_share.encoder}, not LLaVA-1.5's"
                if measured_share else "")
        report.sections.append((f"{name} (computed, not measured; {question_tokens}-token question, {template}, "
                                f"fp16 KV cache; TRIM at {visual_trim} visual tokens{note})", format_table(rows)))
        report.tables[_key(name)] = _columns(rows)
        for analytic in rows:
            prefix = f"{_key(name)}/{analytic.label.lower()}"
            report.metrics.update({f"{prefix}/total_tokens": analytic.total_tokens,
                                   f"{prefix}/prefill_tflops": analytic.prefill_tflops,
                                   f"{prefix}/kv_cache_mib": analytic.kv_cache_mib})
        report.metrics[f"{_key(name)}/flops_ratio"] = rows[1].flops_ratio
        report.metrics[f"{_key(name)}/kv_ratio"] = rows[1].kv_ratio
    return report


def log_report(tracker, report: Report, params: dict) -> None:
    """The report's text, its tables (MLflow table artifacts) and its metrics into the tracker's run."""
    tracker.log_params(params)
    tracker.log_metrics({k: float(v) for k, v in report.metrics.items()}, step=0)
    tracker.log_text(report.text, "efficiency/report.txt")
    for name, columns in report.tables.items():
        tracker.log_table(columns, f"efficiency/{name}.json")


# Inputs of the measured table ----------------------------------------------------------------------


def load_answerer(recipe):
    """The fine-tuned model (paths.checkpoints/<train.run_name>/model) with its CLIP towers, or, when
    there is none yet, the LLM of paths.llm with a fresh projector (timings do not depend on the
    weights' values) and the recipe's TRIM config."""
    from pipelines import storage
    from trim.encoders import ClipEncoder
    from trim.inference import Answerer, default_device, default_dtype
    from trim.llm_tokenizer import load_llm_tokenizer

    paths = recipe.paths
    model_dir = paths.model_dir(recipe.train.run_name)
    if storage.exists(storage.join(model_dir, SETTINGS_FILE)):
        logger.info("model %s", model_dir)
        return Answerer.load(storage.local_copy(model_dir), storage.local_copy(paths.clip))  # on a GPU if any
    paths.require("llm", "clip")
    logger.info("no fine-tuned model at %s; timing %s with a fresh projector", model_dir, paths.llm)
    device = default_device()
    dtype = default_dtype(device)
    encoder = ClipEncoder(paths.clip, device=str(device), dtype=dtype)
    model = load_llava_trim(paths.llm, feature_dim=encoder.feature_dim, settings={"trim": recipe.trim.to_dict()},
                               dtype=dtype)
    return Answerer(model.to(device), load_llm_tokenizer(paths.llm), encoder, recipe.trim)


def sample_image(recipe):
    """The image of the first evaluation question, or a drawn one when there is no evaluation split."""
    import json

    from PIL import Image, ImageDraw

    from pipelines import storage
    from pipelines.images import read_image

    paths = recipe.paths
    if storage.exists(paths.eval_questions):
        for line in storage.read_bytes(paths.eval_questions).decode().splitlines():
            if line.strip():
                try:
                    return read_image(paths.eval_images, json.loads(line)["image"])
                except Exception:
                    break
    image = Image.new("RGB", (480, 320), (40, 70, 220))
    ImageDraw.Draw(image).ellipse((150, 80, 310, 240), fill=(220, 30, 30))
    return image
