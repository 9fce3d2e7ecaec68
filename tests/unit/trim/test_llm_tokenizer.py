"""The LLM tokenizer gives sentencepiece's ids, runs of spaces included, on a Llama-style model built
here: sentencepiece BPE with byte fallback and whitespace-only pieces of low id and lowest score (as
vicuna's tokenizer.model has them: ids 259 on, score -1e9)."""

from __future__ import annotations

import io
import json
import random

import pytest
import sentencepiece
from sentencepiece import sentencepiece_model_pb2

from trim.conversation import tokenize_conversation
from trim.llm_tokenizer import keep_legacy_setting, load_llm_tokenizer, rank_merges_like_sentencepiece

WORDS = "the world of code hello return value def class print list open file read write data model train".split()
TEXTS = ["hello  world", "def f():\n    return value", "the  model\n\n  train   data", "print(x)  # the data",
         "a tab\tand  two  spaces", "list  8  files", "end with spaces  ", "code ▁ literal"]
"""Texts with runs of spaces inside them (none begins with one: see trim/llm_tokenizer.py)."""


@pytest.fixture(scope="module")
def llama_style(tmp_path_factory):
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(400)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, model_type="bpe", vocab_size=400, byte_fallback=True,
        split_digits=True, allow_whitespace_only_pieces=True, character_coverage=1.0, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    pieces = list(proto.pieces)
    first = 3 + 256  # after <unk> <s> </s> and the byte pieces, as in Llama's vocabulary
    runs = []
    for width in (2, 3, 4):
        piece = sentencepiece_model_pb2.ModelProto.SentencePiece()
        piece.piece, piece.score, piece.type = "▁" * width, -1e9, piece.NORMAL
        runs.append(piece)
    del proto.pieces[:]
    proto.pieces.extend(pieces[:first] + runs + pieces[first:])
    folder = tmp_path_factory.mktemp("llama-style")
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": False, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "model_max_length": 2048}))
    return folder, sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))


def test_runs_of_spaces_split_as_sentencepiece_splits_them(llama_style):
    folder, reference = llama_style
    tokenizer = load_llm_tokenizer(folder)
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == reference.encode(text), text
        assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id
        if "▁" not in text:  # a literal ▁ reads back as a space, in sentencepiece too
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    # "hello  world": the run's last space starts the next word, as sentencepiece gives it
    assert tokenizer.tokenize("hello  world") == ["▁hello", "▁", "▁world"]


def test_the_ranking_is_kept_by_save_and_load_and_done_once(llama_style, tmp_path):
    folder, reference = llama_style
    tokenizer = load_llm_tokenizer(folder)
    assert not rank_merges_like_sentencepiece(tokenizer, folder / "tokenizer.model")  # already ranked
    tokenizer.save_pretrained(tmp_path)  # as a checkpoint or an exported model keeps it (tokenizer.json)
    keep_legacy_setting(tokenizer, tmp_path)  # as LlavaTrim.save does: transformers 5 leaves it out
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["legacy"] is False
    again = load_llm_tokenizer(tmp_path)
    assert [again(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == [reference.encode(t) for t in TEXTS]


def test_a_conversation_with_runs_of_spaces_gets_sentencepieces_ids(llama_style):
    folder, reference = llama_style
    tokenizer = load_llm_tokenizer(folder)
    conversation = [{"from": "human", "value": "<image>\nprint the  data"},
                    {"from": "gpt", "value": "def f():\n    return  value"}]
    tokens = tokenize_conversation(conversation, tokenizer, 2048, 0)
    reply = [i for i, label in zip(tokens.input_ids, tokens.labels) if label != -100]
    # the reply's ids are sentencepiece's for the reply (the "ASSISTANT:" round's text), then </s>
    assert reply[:-1] == reference.encode("def f():\n    return  value")[1:] or \
        reply[:-1] == reference.encode(" def f():\n    return  value")[1:]
    assert reply[-1] == tokenizer.eos_token_id


def test_byte_level_tokenizers_are_left_as_they_are(tiny_models):
    from transformers import AutoTokenizer

    plain, loaded = AutoTokenizer.from_pretrained(str(tiny_models.llm)), load_llm_tokenizer(tiny_models.llm)
    assert [loaded(t)["input_ids"] for t in TEXTS] == [plain(t)["input_ids"] for t in TEXTS]
