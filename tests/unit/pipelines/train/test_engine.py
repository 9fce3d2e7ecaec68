"""The DeepSpeed config the engine is built with."""

import pytest

from pipelines.config import TrainConfig
from pipelines.train.engine import deepspeed_config
from trim.formats import load_llava_trim


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

    from trim.batching import pack_batch, pad_batch
    from trim.conversation import IMAGE_TOKEN_INDEX

    model = load_llava_trim(tiny_models.llm, feature_dim=64, dtype=torch.bfloat16, gradient_checkpointing=True)
    model.to("cuda")
    chunk = [{"input_ids": [1, IMAGE_TOKEN_INDEX, 5, 6, 7], "labels": [-100, -100, -100, 6, 7],
              "visual": torch.randn(9, 64, dtype=torch.float16), "length": 13},
             {"input_ids": [1, 8, 9, 10], "labels": [-100, -100, 9, 10], "visual": torch.zeros(0, 64), "length": 4}]
    for batch in (pad_batch(chunk, 0), pack_batch(chunk, 64, 0)):  # as train_data.collate builds them
        loss = model(batch)
        loss.backward()
        assert torch.isfinite(loss) and loss.device.type == "cuda"


class SavingModel:
    """Writes a model folder as LlavaTrim.save does (settings file last); `fail` stops it half way."""

    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save(self, directory, tokenizer=None, state_dict=None):
        (directory / "llm").mkdir(parents=True)
        (directory / "llm" / "model.safetensors").write_text(self.tag)
        if self.fail:
            raise OSError("upload interrupted")
        (directory / "trim_llava.json").write_text(self.tag)


def test_export_writes_beside_the_old_model_and_switches_when_complete(tmp_path):
    from pipelines.train.engine import Built, export

    destination = tmp_path / "run" / "model"
    export(Built(SavingModel("old"), None, None, zero_stage=2), str(destination), is_master=True)
    with pytest.raises(OSError, match="upload interrupted"):
        export(Built(SavingModel("new", fail=True), None, None, zero_stage=2), str(destination), is_master=True)
    files = {p.relative_to(destination).as_posix(): p.read_text() for p in destination.rglob("*") if p.is_file()}
    assert files == {"llm/model.safetensors": "old", "trim_llava.json": "old"}
    export(Built(SavingModel("new"), None, None, zero_stage=2), str(destination), is_master=True)
    assert (destination / "trim_llava.json").read_text() == "new"
    assert sorted(p.name for p in destination.parent.iterdir()) == ["model"]
