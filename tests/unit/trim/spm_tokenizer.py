"""A tiny Llama-style sentencepiece tokenizer, trained here, saved the way vicuna ships its own:
only `tokenizer.model` and `tokenizer_config.json` (no tokenizer.json), so loading it goes through
transformers' sentencepiece conversion (needs the sentencepiece and protobuf packages).

Like Llama's model: BPE, unk 0, bos 1 `<s>`, eos 2 `</s>`, byte fallback, digits split, identity
normalisation, a dummy "▁" prefix, whitespace kept as is. The corpus has "USER" mostly straight
after "</s>" (as in vicuna_v1 prompts), so "USER" is one piece and "▁USER" is not: a non-legacy
tokenizer then spells the "USER" after "</s>" with one id fewer than "USER" tokenized alone, the
case LLaVA's non-legacy correction is written for (vicuna's "▁US", "ER" against "USER").
"""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import sentencepiece

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CORPUS = [
    SYSTEM + " USER: What is in the image? ASSISTANT: A cat on a mat.</s>USER: How many? ASSISTANT: Two.</s>",
    "What color is the bus? Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Hello there, how are you today? I am fine, thank you.",
]


@functools.cache
def spm_model_bytes(vocab_size: int = 400) -> bytes:
    """The serialized sentencepiece model (trained once per process; deterministic)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        num_threads=1,
        minloglevel=2,
    )
    return model.getvalue()


def write_spm_tokenizer(directory: str | Path, legacy: bool, model_max_length: int = 2048) -> Path:
    """Write tokenizer.model + tokenizer_config.json (LlamaTokenizer, the given `legacy`) into
    directory; AutoTokenizer.from_pretrained(directory) loads it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.model").write_bytes(spm_model_bytes())
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": legacy,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory
