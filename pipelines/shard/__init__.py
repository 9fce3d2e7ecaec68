"""Stage 1, shard: the LLaVA mixture (JSON or JSONL, local or s3://) and its images into Parquet shards.

`stage` runs it (Ray Data); `mixture` reads the file's records, `records` checks and templates them,
`image_index` hashes and stores each distinct image once.
"""
