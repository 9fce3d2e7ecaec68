"""Stage 4, evaluate: a trained model answers a question file with online CLIP + TRIM.

`stage` runs it; `inputs` reads the questions and images, `outputs` names and writes the answers,
`scoring` scores them against annotations (VQA accuracy, exact match, POPE), with
`answer_normalization` (VQA's answer normalisation) and `annotation_formats` (benchmarks' own files).
"""
