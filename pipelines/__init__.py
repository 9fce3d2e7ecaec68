"""The stages of the pipeline: a pure core over batches plus a thin Ray Data / Ray Train wrapper each.
Storage (local or S3) and tracking (MLflow, rank 0 only) live here, once."""
