"""What shows the method works, in miniature: the tiny CLIP's training on synthetic scenes, TRIM's
grounding and feature probes, and the ablation of the paper's Table 3."""
