"""The efficiency report's tables and metrics, without Ray or models."""

from __future__ import annotations

import pytest

from pipelines.manifests import CacheManifest, KeptStats
from pipelines.report import PAPER_VISUAL_TOKENS, build_report, cache_share
from trim.efficiency import LlmShape
from trim.timing import TimedRun

RUNS = [TimedRun("TRIM", 21, 80, 0.010, 0.002, 0.001, 8), TimedRun("full", 576, 635, 0.010, 0.008, 0.002, 8)]
FAST = [TimedRun("TRIM", 21, 80, 0.010, 0.001, 0.0005, 8, low_latency=True),
        TimedRun("full", 576, 635, 0.010, 0.004, 0.001, 8, low_latency=True)]
SHAPE = LlmShape(hidden=64, layers=2, heads=4, kv_heads=4, intermediate=192, vocab=1000)


def _manifest(mean_tokens: float) -> CacheManifest:
    return CacheManifest(encoder={"path": "/models/tiny-clip"}, trim={}, samples=1, visual_samples=1,
                         text_only_samples=0, kept=KeptStats(mean_tokens=mean_tokens), cache_bytes=1,
                         bytes_per_visual_sample=1.0, full_feature_bytes_per_image=1)


def test_report_tables_and_metrics():
    report = build_report("tiny", RUNS, SHAPE, question_tokens=32)
    text = report.text
    assert "tiny (measured" in text and "LLaVA-1.5-7B (computed, not measured" in text
    assert "LLaVA-1.5-13B (computed, not measured" in text
    assert report.tables["tiny"]["label"] == ["full", "TRIM"]
    assert report.tables["llava-1.5-7b"]["total_tokens"] == [608, 154]
    assert report.metrics["tiny/full/ttft_ms"] == pytest.approx(18.0)
    assert report.metrics["tiny/ttft_ratio"] == pytest.approx(12 / 18)
    assert report.metrics["llava-1.5-13b/trim/total_tokens"] == 154


def test_the_published_rows_use_the_papers_share_and_label_the_caches_own():
    assert PAPER_VISUAL_TOKENS == 122  # 21% of 576 patches, plus the aggregate token
    assert cache_share(None) is None
    share = cache_share(_manifest(20.4))
    assert share is not None and share.visual_tokens == 20 and share.encoder == "/models/tiny-clip"
    report = build_report("tiny", RUNS, SHAPE, question_tokens=32, measured_share=share)
    table = report.tables["llava-1.5-7b"]
    assert table["label"] == ["full", "TRIM", "TRIM-cache"]
    assert table["visual_tokens"] == [576, 122, 20]  # the paper's share stays the TRIM row
    assert "/models/tiny-clip" in report.text and "not LLaVA-1.5's" in report.text


def test_measured_rows_name_their_device_and_path():
    report = build_report("tiny", RUNS, SHAPE, question_tokens=32, device="NVIDIA H200", low_latency_runs=FAST,
                          bytes_per_element=2, graphs=True)
    titles = [title for title, _ in report.sections]
    assert titles[0].startswith("tiny (measured on NVIDIA H200, eager;")
    assert titles[1].startswith("tiny (measured on NVIDIA H200, low-latency path: static KV cache, CUDA graphs;")
    assert all("computed, not measured" in title for title in titles[2:]) and len(titles) == 4
    assert report.tables["tiny_low_latency"]["label"] == ["full", "TRIM"]
    assert report.metrics["tiny/low_latency/full/ttft_ms"] == pytest.approx(14.0)
    assert report.metrics["tiny/low_latency/ttft_ratio"] == pytest.approx(11 / 14)
    assert report.metrics["tiny/ttft_ratio"] == pytest.approx(12 / 18)  # the eager table keeps its names
    # The KV cache of the rows follows the element size of the model as it ran (fp32 on a CPU).
    fp32 = build_report("tiny", RUNS, SHAPE, question_tokens=32, device="CPU (x86_64)", bytes_per_element=4)
    assert fp32.tables["tiny"]["kv_cache_kib"][0] == 2 * report.tables["tiny"]["kv_cache_kib"][0]
    assert "low-latency" not in fp32.text and "measured on CPU (x86_64), eager" in fp32.text
