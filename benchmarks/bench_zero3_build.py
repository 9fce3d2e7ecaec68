"""ZeRO-3 model build: peak memory per rank while the model is created and loaded, against the rank's
share of the weights, with and without parameters created already partitioned (DeepSpeed's
zero.Init through transformers' HfDeepSpeedConfig, as pipelines/train/engine.build does).

    python benchmarks/bench_zero3_build.py [--layers 18] [--hidden 1024] [--quick]

A ~300M-parameter Llama (fp32) is saved once in sharded safetensors (as real checkpoints ship), then
2 ranks (gloo, on this CPU) each build LlavaTrim from it and hand it to deepspeed.initialize with
ZeRO-3. Each rank reports its peak RSS (VmHWM: its own, not the peak of the parent it was spawned from)
above its RSS before the build (imports excluded), divided by its share of the fp32 weights (all
parameters x 4 bytes / ranks). Ends with one `RESULT {json}` line holding
`zero3_build_peak_rss_over_share` (target <= 1.5) and the same figure without zero.Init. `--quick`
runs the same with a 2-layer, 256-wide Llama (seconds; its ratios are dominated by fixed overheads
and mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from common import peak_rss_mb, status_mb

from trim.formats import load_llava_trim

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _rank(rank: int, world: int, port: int, llm: str, zero_init: bool, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from pipelines.config import TrainConfig
    from pipelines.train.engine import deepspeed_config, zero3_init

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = deepspeed_config(str(REPO / "infra" / "deepspeed" / "zero3.json"), TrainConfig(num_workers=world))
    # Imports excluded: transformers loads a model's module on first use (~150 MB for Llama's).
    from transformers import AutoConfig, AutoModelForCausalLM

    AutoModelForCausalLM._model_mapping[type(AutoConfig.from_pretrained(llm))]
    before = status_mb("VmRSS")
    if zero_init:
        with zero3_init(ds_config):
            model = load_llava_trim(llm, feature_dim=1024)
    else:
        model = load_llava_trim(llm, feature_dim=1024)
    built_peak = peak_rss_mb()
    partitioned = any(hasattr(p, "ds_numel") for p in model.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    engine_peak = peak_rss_mb()
    # Parameters as DeepSpeed sees them: ds_numel is the full size of a partitioned parameter.
    params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    Path(out, f"rank{rank}.json").write_text(json.dumps({
        "rss_before_mb": before, "built_peak_mb": built_peak,
        "engine_peak_mb": engine_peak, "params": params, "partitioned_at_build": partitioned}))


def free_port() -> int:
    """A port nothing on 127.0.0.1 holds now (two runs side by side must not share one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(llm: str, zero_init: bool, port: int, world: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_rank, args=(world, port, llm, zero_init, out), nprocs=world, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    share_mb = ranks[0]["params"] * 4 / world / 2**20
    over = max(r["built_peak_mb"] - r["rss_before_mb"] for r in ranks)
    engine = max(r["engine_peak_mb"] - r["rss_before_mb"] for r in ranks)
    return {"params": ranks[0]["params"], "share_mb": share_mb, "peak_over_before_mb": over,
            "ratio": over / share_mb, "engine_ratio": engine / share_mb,
            "partitioned_at_build": all(r["partitioned_at_build"] for r in ranks)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=18)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--workdir", default=str(REPO / "runs" / "bench-zero3"))
    parser.add_argument("--quick", action="store_true", help="2 layers of width 256")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.hidden = 2, 256
    from transformers import LlamaConfig, LlamaForCausalLM

    llm = Path(args.workdir) / f"llama-{args.layers}x{args.hidden}"
    if not (llm / "config.json").exists():
        config = LlamaConfig(hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                             num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                             num_key_value_heads=args.hidden // 64, vocab_size=32000)
        LlamaForCausalLM(config).save_pretrained(llm, max_shard_size="100MB")
    with_init = measure(str(llm), zero_init=True, port=free_port())
    without = measure(str(llm), zero_init=False, port=free_port())
    print(f"{with_init['params'] / 1e6:.0f}M parameters, 2 ranks, share {with_init['share_mb']:.0f} MB/rank (fp32)")
    print("peak RSS while building the model, above the pre-build RSS: "
          f"zero.Init {with_init['peak_over_before_mb']:.0f}"
          f" MB ({with_init['ratio']:.2f}x share, partitioned at build: {with_init['partitioned_at_build']}); without "
          f"{without['peak_over_before_mb']:.0f} MB ({without['ratio']:.2f}x share)")
    print(f"after deepspeed.initialize (fp32 master weights, Adam moments, buckets): zero.Init "
          f"{with_init['engine_ratio']:.2f}x share, without {without['engine_ratio']:.2f}x")
    print("RESULT " + json.dumps({"zero3_build_peak_rss_over_share": round(with_init["ratio"], 3),
                                  "without_zero_init_peak_rss_over_share": round(without["ratio"], 3),
                                  "zero3_engine_peak_rss_over_share": round(with_init["engine_ratio"], 3),
                                  "partitioned_at_build": with_init["partitioned_at_build"],
                                  "params": with_init["params"], "share_mb": round(with_init["share_mb"], 1)}))


if __name__ == "__main__":
    main()
