"""The DeepSpeed config the engine is built with."""

import pytest

from pipelines.config import TrainConfig
from pipelines.train_engine import deepspeed_config


def test_deepspeed_config_fills_auto_fields():
    cfg = TrainConfig(num_workers=2, micro_batch_size=4, grad_accum_steps=3)
    zero2 = deepspeed_config("infra/deepspeed/zero2.json", cfg)
    assert zero2["zero_optimization"]["stage"] == 2
    assert (zero2["train_micro_batch_size_per_gpu"], zero2["gradient_accumulation_steps"], zero2["train_batch_size"]) == (4, 3, 24)
    assert zero2["bf16"]["enabled"] is False
    assert deepspeed_config("infra/deepspeed/zero3.json", TrainConfig(use_gpu=True))["bf16"]["enabled"] is True
    assert "auto" not in str(zero2)


@pytest.mark.gpu
def test_a_training_step_on_cuda_takes_a_batch_built_on_the_cpu(tiny_models):
    """The first GPU step used to crash ("index is on cpu"): batches are collated on the host."""
    import torch

    from trim.conversation import IMAGE_TOKEN_INDEX
    from trim.model import LlavaTrim, pack_batch, pad_batch

    model = LlavaTrim.from_llm(tiny_models.llm, feature_dim=64, dtype=torch.bfloat16, gradient_checkpointing=True)
    model.to("cuda")
    chunk = [{"input_ids": [1, IMAGE_TOKEN_INDEX, 5, 6, 7], "labels": [-100, -100, -100, 6, 7],
              "visual": torch.randn(9, 64, dtype=torch.float16), "length": 13},
             {"input_ids": [1, 8, 9, 10], "labels": [-100, -100, 9, 10], "visual": torch.zeros(0, 64), "length": 4}]
    for batch in (pad_batch(chunk, 0), pack_batch(chunk, 64, 0)):  # as train_data.collate builds them
        loss = model(batch)
        loss.backward()
        assert torch.isfinite(loss) and loss.device.type == "cuda"
