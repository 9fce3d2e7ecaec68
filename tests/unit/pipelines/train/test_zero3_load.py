"""ZeRO-3 loading one weight file at a time (pipelines/train/zero3_load.py), on 2 gloo ranks: the partitioned
model holds exactly the checkpoint's weights in every layout and file format the trainer reads, and a
bad checkpoint fails on every rank with the file and weight named (no hang)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

from synthetic.tiny_models import build_tiny_llm

REPO = Path(__file__).resolve().parents[4]


def _rank(rank: int, world: int, port: int, cases: dict[str, str], out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import deepspeed

    from pipelines.config import TrainConfig
    from pipelines.train.engine import deepspeed_config, zero3_init
    from trim.formats.base import load_llm

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = deepspeed_config(str(REPO / "infra" / "deepspeed" / "zero3.json"), TrainConfig(num_workers=world))
    results: dict[str, dict] = {}
    for name, path in cases.items():
        try:
            with zero3_init(ds_config):
                llm = load_llm(path, None, torch.float32)
        except ValueError as error:
            results[name] = {"error": str(error)}
            continue
        partitioned = all(hasattr(p, "ds_numel") for p in llm.parameters())
        state = {}
        for key, param in llm.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):
                state[key] = param.detach().clone()
        if rank == 0:
            torch.save(state, Path(out, f"{name}.pt"))
        results[name] = {"partitioned": partitioned, "dtypes": sorted({str(p.dtype) for p in llm.parameters()})}
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("zero3-load")
    llm = build_tiny_llm(root / "safetensors", hidden=64, depth=2)
    model = LlamaForCausalLM.from_pretrained(str(llm))
    sharded = root / "sharded-bin"  # PyTorch shards, as older checkpoints (vicuna-7b-v1.5) ship them
    sharded.mkdir()
    shutil.copy(llm / "config.json", sharded)
    keys = sorted(model.state_dict())
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: model.state_dict()[k] for k in part}, sharded / name)
        weight_map.update(dict.fromkeys(part, name))
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    bad = root / "bad-shape"
    model.save_pretrained(bad)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["model.norm.weight"] = torch.ones(63)
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    return {"safetensors": llm, "sharded-bin": sharded, "bad-shape": bad}


def test_each_rank_holds_its_partition_of_exactly_the_checkpoints_weights(checkpoints, tmp_path):
    cases = {name: str(path) for name, path in checkpoints.items()}
    mp.start_processes(_rank, args=(2, 29631, cases, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = LlamaForCausalLM.from_pretrained(str(checkpoints["safetensors"])).state_dict()
    assert len(list((checkpoints["sharded-bin"]).glob("pytorch_model-*.bin"))) > 1
    for name in ("safetensors", "sharded-bin"):
        assert all(r[name] == {"partitioned": True, "dtypes": ["torch.float32"]} for r in ranks), ranks
        loaded = torch.load(tmp_path / f"{name}.pt", weights_only=True)
        assert set(loaded) == set(expected)
        for key, value in loaded.items():
            assert torch.equal(value, expected[key]), (name, key)
    for r in ranks:  # the same named refusal on both ranks
        assert "model.norm.weight" in r["bad-shape"]["error"] and "model.safetensors" in r["bad-shape"]["error"]
        assert "[63]" in r["bad-shape"]["error"] and "[64]" in r["bad-shape"]["error"]
