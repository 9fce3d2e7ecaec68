"""The DeepSpeed config the engine is built with."""

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
