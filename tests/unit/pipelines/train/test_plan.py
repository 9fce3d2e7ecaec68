"""Step plan, LR schedule and the typed training state."""

import dataclasses

import numpy as np

from pipelines.config import TrainConfig
from pipelines.train.order import epoch_micro_batches, rank_micro_batches
from pipelines.train.plan import TrainState, plan_steps


def test_global_batch_and_steps():
    cfg = TrainConfig(num_workers=8, micro_batch_size=16, grad_accum_steps=1, epochs=1)
    plan = plan_steps(665_298, 624_610, cfg)  # LLaVA-665K: 40,688 text-only samples
    assert plan.global_batch == 128
    # each modality cut on its own: 39,039 + 2,543 micro-batches, padded to 5,198 for each of 8 workers
    assert plan.micro_batches_per_epoch == 5198
    assert plan.total_steps == 5198 and plan.warmup_steps == 156  # ceil(5198 * 0.03), as LLaVA's Trainer
    assert plan_steps(100, 50, TrainConfig(max_steps=7)).total_steps == 7
    accum = plan_steps(64, 64, TrainConfig(num_workers=2, micro_batch_size=4, grad_accum_steps=2, epochs=2))
    assert accum.global_batch == 16 and accum.total_steps == 8


def test_the_plan_counts_the_micro_batches_the_epochs_order_deals_each_worker():
    cfg = TrainConfig(num_workers=2, micro_batch_size=2, grad_accum_steps=1, epochs=3)
    # 7 image samples and 1 text-only: 4 + 1 micro-batches, padded to 6, 3 a worker (8 / 2 / 2 would say 2)
    image = np.arange(8) < 7
    batches = epoch_micro_batches(np.full(8, 50, dtype=np.int32), image, 2, 2, 1, seed=0, epoch=0)
    plan = plan_steps(8, 7, cfg)
    assert plan.micro_batches_per_epoch == len(rank_micro_batches(batches, 0, 2)) == 3
    assert plan.total_steps == 9
    plain = plan_steps(8, 7, dataclasses.replace(cfg, group_by_length=False))
    assert plain.micro_batches_per_epoch == 2  # one shuffle of all samples: 4 micro-batches


def test_the_schedule_is_llavas_at_every_step_of_llava_1_5(tmp_path):
    """LLaVA-1.5's fine-tuning: 5,198 steps, warmup ratio 0.03, cosine; its Trainer builds the schedule
    with TrainingArguments.get_warmup_steps and transformers' "cosine" scheduler."""
    import torch
    from transformers import TrainingArguments, get_scheduler

    from pipelines.train.engine import lr_scheduler

    cfg = TrainConfig(max_steps=5198, warmup_ratio=0.03, lr=2e-5)
    plan = plan_steps(665_298, 624_610, cfg)
    args = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.03, lr_scheduler_type="cosine",
                             learning_rate=2e-5, max_steps=5198, report_to=[])

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=2e-5)

    ours = lr_scheduler(optimizer(), plan)
    theirs = get_scheduler(args.lr_scheduler_type, optimizer(), num_warmup_steps=args.get_warmup_steps(5198),
                           num_training_steps=5198)
    assert plan.warmup_steps == args.get_warmup_steps(5198) == 156
    for step in range(5198):
        assert ours.get_last_lr() == theirs.get_last_lr(), step
        ours.optimizer.step(), theirs.optimizer.step()
        ours.step(), theirs.step()
    ours_lrs = [lr_scheduler(optimizer(), plan).lr_lambdas[0](s) for s in (0, 78, 156, 5198)]
    assert ours_lrs[0] == 0.0 and ours_lrs[1] == 0.5 and ours_lrs[2] == 1.0 and ours_lrs[3] == 0.0


def test_train_state_round_trips_and_ignores_unknown_keys():
    state = TrainState(step=8, epoch=1, micro_in_epoch=3, mlflow_run_id="abc", first_loss=2.5)
    assert TrainState.from_json(state.to_json()) == state
    assert TrainState.from_json('{"step": 4, "later_field": 1}') == TrainState(step=4)


def test_a_resume_must_share_the_cache_the_training_settings_and_the_workers():
    from pipelines.train.identity import identity_differences, run_identity

    manifest = {"encoder": {"path": "clip"}, "trim": {"keep": "least_similar"}, "samples": 64, "cache_bytes": 10}
    base = {**run_identity(TrainConfig(), manifest, "llm", ""), "workers": 2}
    assert identity_differences(base, dict(base)) == []
    assert identity_differences(None, base) == []  # a checkpoint from before identities were recorded
    # Run control may change between a stop and a resume ...
    same = run_identity(TrainConfig(max_steps=99, checkpoint_every=5, preload=True), manifest, "llm", "")
    assert identity_differences(base, {**same, "workers": 2}) == []
    # ... what is learned from which data may not.
    other = run_identity(TrainConfig(lr=0.5, micro_batch_size=8), {**manifest, "samples": 65}, "llm", "")
    assert identity_differences(base, {**other, "workers": 4}) == [
        "cache.samples", "train.lr", "train.micro_batch_size", "workers"]
    # An epoch continues exactly only under the order's rules it began with: steps are now random draws
    # (and packed ones split with even totals), so a run checkpointed before (no "order" recorded, or
    # rules 2) is not continued, padded or packed ...
    old = {k: v for k, v in base.items() if k != "order"}
    assert base["order"] == 4 and identity_differences(old, base) == ["order"]
    assert identity_differences({**base, "order": 2}, base) == ["order"]
    padded = {**run_identity(TrainConfig(packing=False), manifest, "llm", ""), "workers": 2}
    assert padded["order"] == 3 and identity_differences({k: v for k, v in padded.items() if k != "order"},
                                                         padded) == ["order"]
    # ... while a plain shuffle (group_by_length off), whose order never changed, is.
    plain = {**run_identity(TrainConfig(group_by_length=False), manifest, "llm", ""), "workers": 2}
    assert identity_differences({k: v for k, v in plain.items() if k != "order"}, plain) == []
