"""Synthetic data and tiny models for the demo and the tests: scenes of coloured shapes, their texts,
a mixture in LLaVA's format, and tiny CLIP and Llama models built and saved with `save_pretrained`."""
