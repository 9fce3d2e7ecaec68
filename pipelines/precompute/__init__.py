"""Stage 2, precompute: CLIP features and TRIM reductions of the shards, once, into the TRIM cache.

`stage` runs it (Ray Data: CPU tasks prepare images, an actor pool encodes); `units` plans the work
units and finds what a rerun can skip, `prepare` decodes and pads images and tokenizes CLIP texts,
`encode` runs the vision tower and TRIM on a batch.
"""
