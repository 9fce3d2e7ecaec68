"""Stage 3, fine-tune: projector + LLM on the TRIM cache with Ray Train and DeepSpeed, tracked in MLflow.

`runs` is the run policy (names that follow the cache, resume checks, retention) over `launch`, which
starts the Ray Train workers; each runs `worker` (the step loop) on `engine` (model and DeepSpeed),
reading rows through `data` in the order `order` draws, on the schedule and identity of `plan`.
`checkpoints` saves, finds and restores; `zero3_load` streams weights into ZeRO-3 partitions;
`publish` writes the final model.
"""
