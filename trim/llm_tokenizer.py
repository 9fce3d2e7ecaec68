"""The LLM's tokenizer, giving the ids of the sentencepiece tokenizer LLaVA trained with.

Vicuna (a Llama-1/2 model) ships a sentencepiece BPE `tokenizer.model`, and LLaVA-1.5 tokenizes with
the slow sentencepiece tokenizer (`use_fast=False` in llava/train/train.py, transformers 4.37).
transformers 5 builds a `tokenizers` BPE from that model, but ranks the merges by piece id, so the
whitespace-only pieces (ids 259 on, kept by sentencepiece for last: score -1e9) merge first, and a run
of spaces no longer leaves its last space to the next word: "Hello  world" gives ▁Hello ▁▁ world where
sentencepiece gives ▁Hello ▁ ▁world (and "    return", ▁▁▁▁ return for ▁▁▁ ▁return). Code and
markdown in ShareGPT's conversations are full of such runs. `load_llm_tokenizer` ranks the merges by
the scores of the pieces they make, as sentencepiece applies them.

Checked against the slow tokenizer of transformers 4.37 on vicuna's tokenizer.model: the same ids on
239 paragraphs of code and markdown (108 of them differed before) and on multi-turn conversations
with runs of spaces, tabs and a literal ▁. One difference remains, in transformers' Metaspace rather
than the merges: a text that begins with a space, tokenized on its own, gets no extra leading ▁
(sentencepiece adds one), which LLaVA's prompts never are (they begin with the system message; a
chunk after <image> with its newline).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

SENTENCEPIECE_FILE = "tokenizer.model"
SENTENCEPIECE_BPE = 2
"""sentencepiece's TrainerSpec.model_type for BPE."""


def rank_merges_like_sentencepiece(tokenizer: Any, model_file: str | Path) -> bool:
    """Reorder the BPE merges of a `tokenizers`-backed tokenizer, in place, by the sentencepiece score
    of the piece each makes (highest first; ties keep their order): the order in which sentencepiece
    merges. True where the order changed; False for a tokenizer that is not BPE, a sentencepiece model
    that is not BPE, or merges already in that order."""
    import sentencepiece
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    proto: Any = sentencepiece_model_pb2.ModelProto()  # type: ignore[attr-defined]  # generated, untyped
    proto.ParseFromString(Path(model_file).read_bytes())
    state = json.loads(backend.to_str())
    if proto.trainer_spec.model_type != SENTENCEPIECE_BPE or state["model"].get("type") != "BPE":
        return False
    model = sentencepiece.SentencePieceProcessor(model_proto=proto.SerializeToString())
    scores = {model.id_to_piece(i): model.get_score(i) for i in range(model.get_piece_size())}
    merges = state["model"]["merges"]

    def made(merge: list[str] | str) -> str:  # tokenizers writes a merge as [left, right] or "left right"
        return "".join(merge) if isinstance(merge, list) else merge.replace(" ", "", 1)

    order = sorted(range(len(merges)), key=lambda i: -scores.get(made(merges[i]), -math.inf))
    if order == list(range(len(merges))):
        return False
    state["model"]["merges"] = [merges[i] for i in order]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(state))  # the backend a TokenizersBackend wraps
    return True


def keep_legacy_setting(tokenizer: Any, directory: str | Path) -> None:
    """Write a Llama tokenizer's `legacy` into the tokenizer_config.json it was saved with, where
    transformers 5's save_pretrained leaves it out: the setting decides the ids after a special token,
    and an export read by LLaVA's slow tokenizer must say which ones training saw."""
    config = Path(directory) / "tokenizer_config.json"
    legacy = getattr(tokenizer, "legacy", None)
    if not isinstance(legacy, bool) or not config.exists():
        return
    settings = json.loads(config.read_text())
    if "legacy" not in settings:
        config.write_text(json.dumps({**settings, "legacy": legacy}, indent=2, sort_keys=True))


TOKENIZATION = 2
"""The version of how LLM text becomes ids, recorded where outputs depend on it (evaluation answers):
1, transformers 5's merges as it ranks them; 2, a sentencepiece model's merges ranked by score."""


def load_llm_tokenizer(path: str | Path, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained(path)`; where the folder holds a sentencepiece BPE model, its
    merges ranked as sentencepiece ranks them (rank_merges_like_sentencepiece). Byte-level tokenizers
    (GPT-2, Llama-3) come as they are."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    model_file = Path(path) / SENTENCEPIECE_FILE
    if model_file.is_file():
        rank_merges_like_sentencepiece(tokenizer, model_file)
    return tokenizer
