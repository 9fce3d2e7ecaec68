"""benchmarks/gpu_check.py at tiny size on the CPU: every section runs (or says why not) and the
RESULT line carries the figures the GPU run is read for. The engine section runs the fine-tuning
worker's own loop with DeepSpeed (on a fresh machine DeepSpeed first compiles its CPU shared-memory
op, once, which can take minutes)."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_tiny_runs_every_section_on_cpu(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "TOKENIZERS_PARALLELISM": "false"}
    # serve: its quick form is bench_serve.py's, which tests/unit/test_benchmarks.py runs
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--out", str(tmp_path),
                           "--skip", "serve"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1 and proc.stdout.rstrip().endswith(lines[0])
    result = json.loads(lines[0][len("RESULT "):])
    assert result["errors"] == {}
    for key in ("train_step_full_padded_s", "train_step_trim_padded_s", "train_step_full_packed_s",
                "train_step_trim_packed_s", "step_ratio_padded", "step_ratio_packed", "packed_over_token_ratio",
                "ttft_b1_eager_ratio", "prefill_b16_ratio", "decode_ms_per_token_full", "decode_ms_per_token_trim",
                "ttft_b1_eager_ratio_13b", "encoder_stage_over_raw", "cpu_preprocess_images_per_s_per_core",
                "ttft_b1_lowlatency_ratio", "eval_questions_per_s_ratio", "eval_questions_per_s_ratio_eager",
                "eval_questions_per_s_ratio_varied", "eval_questions_per_s_ratio_sorted"):
        assert result[key] > 0, key
    assert 0 <= result["eval_sorted_padding_share"] < 1 and result["eval_sort_window"] >= 1
    assert 2.0 < result["token_ratio"] < 4.0
    assert result["packed_attn"] == "sdpa_packed"  # the CPU default
    # Packing changes neither the loss nor the tokens; it removes padding.
    assert result["packed_loss_rel_diff_full"] < 1e-4 and result["packed_loss_rel_diff_trim"] < 1e-4
    assert result["padding_share_trim_packed"] < result["padding_share_trim_padded"]
    # KV cache: the analytic count is what the cache holds.
    assert result["kv_bytes_measured_full"] == result["kv_bytes_full"] > result["kv_bytes_trim"]
    assert result["encoder_truncated_vs_hidden_states_max_diff"] == 0.0
    assert result["graph_plain_forward_max_diff"] < 1e-4
    # The low-latency path answers as the eager one in fp32 (on the GPU, bf16 near-ties may flip).
    assert result["lowlatency_tokens_match_eager_full"] and result["lowlatency_tokens_match_eager_trim"]
    assert result["tensor_resize_max_abs_diff"] <= 2
    assert set(result["skipped"]) == {"graph_7b", "graph_13b", "gpu_decode", "serve"}
    # The engine: full and TRIM steps, checkpoints, a resume that continues exactly, the 16-bit export.
    for key in ("engine_step_full_s", "engine_step_trim_s", "engine_step_ratio", "engine_token_ratio",
                "engine_peak_gib_full", "engine_peak_gib_trim", "engine_export_gib"):
        assert result[key] > 0, key
    assert result["engine_tokens_full"] > result["engine_tokens_trim"] > 0
    assert result["engine_losses_finite"] and result["engine_loss_decreasing"] and result["engine_export_learned"]
    assert result["engine_loss_last_trim"] < result["engine_loss_first_trim"]
    steps = result["engine_steps"]
    middle = f"checkpoint_step_{steps // 2:08d}"
    assert result["engine_checkpoints_trim"] == [middle, f"checkpoint_step_{steps:08d}"]
    assert result["engine_resumed_steps"] == list(range(steps // 2 + 1, steps + 1))
    assert result["engine_resume_next_loss_equal"] and result["engine_resume_max_rel_diff"] == 0.0
    assert result["engine_resume_exported"]
    assert json.loads((tmp_path / "result.json").read_text()) == result
    assert (tmp_path / "log.txt").read_text().rstrip().endswith(lines[0])
