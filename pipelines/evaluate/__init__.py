"""Stage 4, evaluate: a trained model answers a question file with online CLIP + TRIM.

`stage` runs it (Ray Data) and writes, scores and logs; `questions` reads the question file, `inputs`
fetches and prepares the images, `answering` answers prepared batches (the actor), `outputs` names
the evaluation's folder; `annotations` reads annotation and answer files and matches them, `scoring`
scores (VQA accuracy, exact match, yes/no, choice) with `answer_normalization` (VQA's normalisation
of answers), and `annotation_formats` converts benchmarks' own files into annotations.
"""
