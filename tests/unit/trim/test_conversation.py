"""trim.conversation against hand-worked vicuna_v1 expectations and, by property, random conversations."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from trim.conversation import (
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    SYSTEM_PROMPT,
    conversation_prompt,
    generation_prompt,
    template_conflict,
    tokenize_conversation,
    tokenize_prompt,
    trim_text,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE: every string round-trips exactly, so decoded spans can be compared as text."""
    model = Tokenizer(models.BPE(unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [SYSTEM_PROMPT, "USER: What is in the image? ASSISTANT: A cat on a mat.", "How many? Two."]
    model.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        clean_up_tokenization_spaces=False,
    )


def decode(tokenizer: PreTrainedTokenizerFast, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def supervised_runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of supervised labels."""
    runs: list[tuple[int, int]] = []
    for i, label in enumerate(labels):
        if label == IGNORE_INDEX:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def human(value: str) -> dict[str, str]:
    return {"from": "human", "value": value}


def gpt(value: str) -> dict[str, str]:
    return {"from": "gpt", "value": value}


SINGLE = [human("<image>\nWhat is in the image?"), gpt("A cat.")]
MULTI = [human("<image>\nWhat is in the image?"), gpt("A cat."), human("How many?"), gpt("Two.")]


def test_special_tokens_are_single_ids(tokenizer):
    assert tokenizer.encode("</s>", add_special_tokens=False) == [tokenizer.eos_token_id]
    assert tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id


def test_prompt_text_matches_llava_separator_style_two():
    assert conversation_prompt(MULTI) == (
        SYSTEM_PROMPT
        + " USER: <image>\nWhat is in the image? ASSISTANT: A cat.</s>USER: How many? ASSISTANT: Two.</s>"
    )


def test_single_turn_with_image(tokenizer):
    out = tokenize_conversation(SINGLE, tokenizer, max_length=512)
    ids, labels, pos = out.input_ids, out.labels, out.image_position
    assert len(ids) == len(labels)
    assert ids[0] == tokenizer.bos_token_id and labels[0] == IGNORE_INDEX
    assert ids.count(IMAGE_TOKEN_INDEX) == 1 and ids[pos] == IMAGE_TOKEN_INDEX
    assert decode(tokenizer, ids[1:pos]) == SYSTEM_PROMPT + " USER: "
    [(start, end)] = supervised_runs(labels)
    assert end == len(ids)
    assert all(label == IGNORE_INDEX for label in labels[:start])  # BOS, system, image, user turn
    assert decode(tokenizer, ids[pos + 1 : start]) == "\nWhat is in the image? ASSISTANT:"
    assert labels[start:] == ids[start:]
    assert decode(tokenizer, labels[start:]) == " A cat.</s>"
    assert labels[-1] == tokenizer.eos_token_id
    assert not out.truncated and not out.image_cut and out.num_supervised == end - start


def test_multi_turn_supervises_both_replies_and_masks_second_user_turn(tokenizer):
    out = tokenize_conversation(MULTI, tokenizer, max_length=512)
    ids, labels = out.input_ids, out.labels
    first, second = supervised_runs(labels)
    assert decode(tokenizer, ids[first[0] : first[1]]) == " A cat.</s>"
    assert decode(tokenizer, ids[second[0] : second[1]]) == " Two.</s>"
    assert decode(tokenizer, ids[first[1] : second[0]]) == "USER: How many? ASSISTANT:"
    assert set(labels[first[1] : second[0]]) == {IGNORE_INDEX}
    assert second[1] == len(ids)


def test_text_only_has_no_placeholder(tokenizer):
    conv = [human("Hi there"), gpt("Hello.")]
    out = tokenize_conversation(conv, tokenizer, max_length=512, num_visual_tokens=576)
    assert out.image_position is None and IMAGE_TOKEN_INDEX not in out.input_ids
    assert decode(tokenizer, out.input_ids) == "<s>" + SYSTEM_PROMPT + " USER: Hi there ASSISTANT: Hello.</s>"
    [(start, _)] = supervised_runs(out.labels)
    assert decode(tokenizer, out.input_ids[start:]) == " Hello.</s>"


@pytest.mark.parametrize(
    "first, moved",
    [
        ("What is this?\n<image>", "<image>\nWhat is this?"),  # A-OKVQA style: tag last
        ("  <image>\nWhat is this?  ", "<image>\nWhat is this?"),
        ("Left <image> right", "<image>\nLeft  right"),  # the tag goes, the spaces around it stay
        ("<image>", "<image>"),  # nothing else: no newline either (LLaVA strips the result)
    ],
)
def test_image_anywhere_in_first_turn_moves_to_the_front(tokenizer, first, moved):
    # LLaVA's preprocess_multimodal: "<image>\n" + the rest with the tag removed and stripped.
    conv = [human(first), gpt("A cat.")]
    assert conversation_prompt(conv) == SYSTEM_PROMPT + f" USER: {moved} ASSISTANT: A cat.</s>"
    out = tokenize_conversation(conv, tokenizer, max_length=512)
    pos = out.image_position
    assert decode(tokenizer, out.input_ids[1:pos]) == SYSTEM_PROMPT + " USER: "
    assert decode(tokenizer, out.input_ids[pos + 1 :]) == moved[len("<image>") :] + " ASSISTANT: A cat.</s>"
    assert out.labels[pos] == IGNORE_INDEX and out.num_supervised > 0


def test_trim_text_follows_the_moved_tag():
    conv = [human("What is this?\n<image>"), gpt("A cat.")]
    assert trim_text(conv, "conversation") == SYSTEM_PROMPT + " USER: \nWhat is this? ASSISTANT: A cat.</s>"
    assert trim_text(conv, "first_question") == trim_text(conv, "questions") == "What is this?"


def test_training_prefix_equals_inference_prompt(tokenizer):
    out = tokenize_conversation(SINGLE, tokenizer, max_length=512)
    [(start, _)] = supervised_runs(out.labels)
    prompt = tokenize_prompt(generation_prompt("What is in the image?", with_image=True), tokenizer)
    assert out.input_ids[:start] == prompt


def test_no_truncation_at_exact_fit(tokenizer):
    n = len(tokenize_conversation(MULTI, tokenizer, max_length=10_000).input_ids)
    out = tokenize_conversation(MULTI, tokenizer, max_length=n - 1 + 50, num_visual_tokens=50)
    assert not out.truncated and len(out.input_ids) == n


def test_truncation_counts_visual_tokens_and_keeps_a_prefix(tokenizer):
    full = tokenize_conversation(MULTI, tokenizer, max_length=10_000)
    visual = 50
    max_length = len(full.input_ids) - 1 + visual - 3
    out = tokenize_conversation(MULTI, tokenizer, max_length=max_length, num_visual_tokens=visual)
    assert out.truncated and not out.image_cut
    assert len(out.input_ids) - 1 + visual == max_length
    assert out.input_ids == full.input_ids[: len(out.input_ids)]
    assert out.labels == full.labels[: len(out.labels)]
    assert out.image_position == full.image_position
    assert 0 < out.num_supervised < full.num_supervised  # the second reply lost its last 3 tokens


def test_truncation_never_splits_the_visual_tokens(tokenizer):
    full = tokenize_conversation(SINGLE, tokenizer, max_length=10_000)
    pos, visual = full.image_position, 100
    # The image just fits: the placeholder is kept, everything after it is cut.
    fits = tokenize_conversation(SINGLE, tokenizer, max_length=pos + visual, num_visual_tokens=visual)
    assert fits.truncated and not fits.image_cut
    assert fits.input_ids == full.input_ids[: pos + 1] and fits.image_position == pos
    assert fits.num_supervised == 0
    # One position short: the image is dropped whole rather than cut inside its tokens.
    cut = tokenize_conversation(SINGLE, tokenizer, max_length=pos + visual - 1, num_visual_tokens=visual)
    assert cut.truncated and cut.image_cut and cut.image_position is None
    assert cut.input_ids == full.input_ids[:pos] and IMAGE_TOKEN_INDEX not in cut.input_ids
    assert cut.num_supervised == 0


@pytest.mark.parametrize(
    "conversations, message",
    [
        ([], "empty"),
        ([gpt("Hi."), human("Hello?")], "expected 'human'"),
        ([human("a"), human("b")], "expected 'gpt'"),
        ([human("<image>\n<image>\nTwo?"), gpt("Yes.")], "at most one"),
        ([human("<image>\nA?"), gpt("B."), human("<image>\nC?"), gpt("D.")], "only the first human turn"),
        ([human("A?"), gpt("B."), human("C?")], "no reply"),
        ([{"from": "human"}], "mapping"),
    ],
)
def test_bad_conversations_raise(tokenizer, conversations, message):
    with pytest.raises(ValueError, match=message):
        tokenize_conversation(conversations, tokenizer, max_length=512)


def test_bad_lengths_raise(tokenizer):
    with pytest.raises(ValueError):
        tokenize_conversation(SINGLE, tokenizer, max_length=0)
    with pytest.raises(ValueError):
        tokenize_conversation(SINGLE, tokenizer, max_length=10, num_visual_tokens=-1)


def test_trim_text_modes():
    assert trim_text(MULTI, "questions") == "What is in the image? How many?"
    assert trim_text(MULTI, "first_question") == "What is in the image?"
    assert trim_text(MULTI, "conversation") == (
        SYSTEM_PROMPT
        + " USER: \nWhat is in the image? ASSISTANT: A cat.</s>USER: How many? ASSISTANT: Two.</s>"
    )
    with pytest.raises(ValueError, match="mode"):
        trim_text(MULTI, "answers")  # type: ignore[arg-type]


def test_generation_prompt_text():
    assert generation_prompt("What is it?", with_image=True) == (
        SYSTEM_PROMPT + " USER: <image>\nWhat is it? ASSISTANT:"
    )
    no_image = generation_prompt("What is it?", with_image=False)
    assert no_image == SYSTEM_PROMPT + " USER: What is it? ASSISTANT:"


def test_tokenize_prompt_places_one_placeholder(tokenizer):
    ids = tokenize_prompt(generation_prompt("Why?", with_image=True), tokenizer)
    pos = ids.index(IMAGE_TOKEN_INDEX)
    assert ids[0] == tokenizer.bos_token_id and ids.count(IMAGE_TOKEN_INDEX) == 1
    assert decode(tokenizer, ids[1:pos]) + "<image>" + decode(tokenizer, ids[pos + 1 :]) == generation_prompt(
        "Why?", with_image=True
    )


# No '<' or '>' so that random text never spells a special token or the image tag; never empty,
# since LLaVA's template writes an empty message without its separator (tested apart).
TEXT = st.text(st.characters(codec="utf-8", exclude_characters="<>"), min_size=1, max_size=24)


@st.composite
def conversations(draw) -> list[dict[str, str]]:
    rounds = draw(st.lists(st.tuples(TEXT, TEXT), min_size=1, max_size=4))
    turns = [turn for q, a in rounds for turn in (human(q), gpt(a))]
    if draw(st.booleans()):
        first = turns[0]["value"]
        cut = draw(st.integers(0, len(first)))
        turns[0] = human(first[:cut] + "<image>" + first[cut:])
    return turns


@settings(max_examples=60, deadline=None)
@given(conv=conversations())
def test_labels_are_exactly_the_replies(tokenizer, conv):
    out = tokenize_conversation(conv, tokenizer, max_length=100_000)
    ids, labels = out.input_ids, out.labels
    assert len(ids) == len(labels) and not out.truncated and out.mask_reason is None
    assert all(label == IGNORE_INDEX or label == ids[i] for i, label in enumerate(labels))
    supervised = [label for label in labels if label != IGNORE_INDEX]
    replies = [turn["value"] for turn in conv[1::2]]
    assert decode(tokenizer, supervised) == "".join(f" {reply}</s>" for reply in replies)
    # The whole sequence is the templated text, with the placeholder where <image> was.
    pos = out.image_position
    if pos is None:
        assert decode(tokenizer, ids) == "<s>" + conversation_prompt(conv)
    else:
        assert labels[pos] == IGNORE_INDEX
        text = decode(tokenizer, ids[:pos]) + "<image>" + decode(tokenizer, ids[pos + 1 :])
        assert text == "<s>" + conversation_prompt(conv)


@settings(max_examples=60, deadline=None)
@given(conv=conversations(), max_length=st.integers(1, 300), visual=st.integers(0, 120))
def test_truncation_bound_and_prefix(tokenizer, conv, max_length, visual):
    full = tokenize_conversation(conv, tokenizer, max_length=100_000)
    out = tokenize_conversation(conv, tokenizer, max_length, num_visual_tokens=visual)
    positions = len(out.input_ids) + (0 if out.image_position is None else visual - 1)
    full_positions = len(full.input_ids) + (0 if full.image_position is None else visual - 1)
    assert positions <= max_length
    assert out.truncated == (full_positions > max_length)
    assert out.input_ids == full.input_ids[: len(out.input_ids)]
    assert out.labels == full.labels[: len(out.labels)]
    assert out.image_cut == (full.image_position is not None and out.image_position is None)
    if out.image_position is not None:
        assert out.image_position == full.image_position


# LLaVA-1.5's exact ids with a Llama-style sentencepiece tokenizer (legacy and not). The expected
# ids and labels are worked out here the way LLaVA's preprocess_v1 does, from tokenizer calls on the
# literal prompt pieces, never from trim.conversation.

SPM_SYSTEM = SYSTEM_PROMPT


@pytest.fixture(scope="module", params=[True, False], ids=["legacy", "non-legacy"])
def spm(request, tmp_path_factory):
    from transformers import AutoTokenizer

    from tests.unit.trim.spm_tokenizer import write_spm_tokenizer

    path = write_spm_tokenizer(tmp_path_factory.mktemp("spm") / str(request.param), legacy=request.param)
    return AutoTokenizer.from_pretrained(path)


def llava_ids(tok, text: str) -> list[int]:
    """LLaVA's tokenizer_image_token, spelled out: tokenizer(chunk).input_ids per chunk, BOS kept once."""
    first, *rest = text.split("<image>")
    ids = tok(first).input_ids
    for chunk in rest:
        ids += [IMAGE_TOKEN_INDEX] + tok(chunk).input_ids[1:]
    return ids


def llava_expected(tok, rounds: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of preprocess_v1 for a prompt given as its rounds, each (instruction text
    up to and including "ASSISTANT: ", reply): the prompt is the rounds joined, each + "</s>"."""
    input_ids = llava_ids(tok, "".join(instruction + reply + "</s>" for instruction, reply in rounds))
    labels, cur = [IGNORE_INDEX], 1
    for i, (instruction, reply) in enumerate(rounds):
        round_len = len(llava_ids(tok, instruction + reply))
        instruction_len = len(llava_ids(tok, instruction)) - 2
        if i > 0 and not tok.legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels += [IGNORE_INDEX] * instruction_len + input_ids[cur + instruction_len : cur + round_len]
        cur += round_len
    assert cur == len(input_ids) == len(labels)  # LLaVA's mismatch check passes
    return input_ids, labels


def spm_supervised_text(tok, out) -> list[str]:
    """Each supervised run as text: "▁" read as a space, ASCII byte pieces (<0x42>) as their byte."""

    def text(piece: str) -> str:
        return chr(int(piece[3:5], 16)) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else piece.replace("▁", " ")

    runs = supervised_runs(out.labels)
    return ["".join(map(text, tok.convert_ids_to_tokens(out.input_ids[a:b]))) for a, b in runs]


def test_spm_tokenizer_loads_from_tokenizer_model_alone(spm):
    assert type(spm).__name__ == "LlamaTokenizer"
    assert (spm.unk_token_id, spm.bos_token_id, spm.eos_token_id) == (0, 1, 2)
    assert spm("Hi").input_ids[0] == spm.bos_token_id and spm("Hi").input_ids[-1] != spm.eos_token_id
    # What the non-legacy correction is for: no "▁" before the USER that follows "</s>".
    ids = spm("a.</s>USER:").input_ids
    after_eos = ids[ids.index(spm.eos_token_id) + 1 :]
    alone = spm("USER:").input_ids[1:]
    assert len(after_eos) == len(alone) - (0 if spm.legacy else 1)


def test_spm_single_turn_image_record(spm):
    conv = [human("<image>\nWhat is in the image?"), gpt("A cat.")]
    ids, labels = llava_expected(spm, [(SPM_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: ", "A cat.")])
    out = tokenize_conversation(conv, spm, max_length=2048, num_visual_tokens=576)
    assert out.input_ids == ids and out.labels == labels
    assert out.image_position == ids.index(IMAGE_TOKEN_INDEX) and out.mask_reason is None
    assert spm_supervised_text(spm, out) == [" A cat.</s>"]


def test_spm_multi_turn_image_record(spm):
    conv = [human("<image>\nWhat is in the image?"), gpt("A cat."), human("How many?"), gpt("Two."),
            human("And the colour?"), gpt("Grey.")]
    rounds = [(SPM_SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT: ", "A cat."),
              ("USER: How many? ASSISTANT: ", "Two."), ("USER: And the colour? ASSISTANT: ", "Grey.")]
    ids, labels = llava_expected(spm, rounds)
    out = tokenize_conversation(conv, spm, max_length=2048, num_visual_tokens=576)
    assert out.input_ids == ids and out.labels == labels and out.mask_reason is None
    assert spm_supervised_text(spm, out) == [" A cat.</s>", " Two.</s>", " Grey.</s>"]


def test_spm_image_at_the_end_of_the_question(spm):
    # A-OKVQA style: the tag ends the question; LLaVA moves it to the front.
    question = "What color is the bus?\nA. red\nB. blue\nAnswer with the option's letter from the given choices directly."
    conv = [human(question + "\n<image>"), gpt("B")]
    ids, labels = llava_expected(spm, [(SPM_SYSTEM + " USER: <image>\n" + question + " ASSISTANT: ", "B")])
    out = tokenize_conversation(conv, spm, max_length=2048, num_visual_tokens=576)
    assert out.input_ids == ids and out.labels == labels
    # "B" is a byte piece here, so the reply's space is a token of its own, supervised as in LLaVA.
    assert spm.convert_ids_to_tokens(out.input_ids[-3:]) == ["▁", "<0x42>", "</s>"]
    assert spm_supervised_text(spm, out) == [" B</s>"]


def test_spm_text_only_record(spm):
    conv = [human("Hello there, how are you today?"), gpt("I am fine."), human("Thank you."), gpt("You are welcome.")]
    rounds = [(SPM_SYSTEM + " USER: Hello there, how are you today? ASSISTANT: ", "I am fine."),
              ("USER: Thank you. ASSISTANT: ", "You are welcome.")]
    ids, labels = llava_expected(spm, rounds)
    assert ids == spm(SPM_SYSTEM + " USER: Hello there, how are you today? ASSISTANT: I am fine.</s>"
                      "USER: Thank you. ASSISTANT: You are welcome.</s>").input_ids  # one tokenizer call, as LLaVA
    out = tokenize_conversation(conv, spm, max_length=2048, num_visual_tokens=576)
    assert out.input_ids == ids and out.labels == labels and out.image_position is None
    assert spm_supervised_text(spm, out) == [" I am fine.</s>", " You are welcome.</s>"]


def test_spm_training_prefix_equals_inference_prompt(spm):
    out = tokenize_conversation([human("<image>\nWhat is in the image?"), gpt("A cat.")], spm, max_length=2048)
    [(start, _)] = supervised_runs(out.labels)
    assert out.input_ids[:start] == tokenize_prompt(generation_prompt("What is in the image?", with_image=True), spm)


def test_rounds_that_do_not_add_up_mask_the_whole_sample(spm, caplog):
    # A tokenizer whose `legacy` flag lies: LLaVA's round arithmetic is then off by one per round
    # after the first, and LLaVA masks the sample ("tokenization mismatch").
    conv = [human("<image>\nWhat is in the image?"), gpt("A cat."), human("How many?"), gpt("Two.")]
    good = tokenize_conversation(conv, spm, max_length=2048)
    spm.legacy = not spm.legacy
    try:
        out = tokenize_conversation(conv, spm, max_length=2048)
        single = tokenize_conversation(conv[:2], spm, max_length=2048)
    finally:
        spm.legacy = not spm.legacy
    assert out.input_ids == good.input_ids and out.num_supervised == 0
    assert out.mask_reason.startswith("tokenization mismatch")
    assert "tokenization mismatch" in caplog.text
    assert single.num_supervised > 0 and single.mask_reason is None  # the correction skips round one
    # At or past max_length LLaVA does not check, and neither do we.
    unchecked = tokenize_conversation(conv, spm, max_length=len(good.input_ids) - 5)
    assert unchecked.mask_reason is None and unchecked.num_supervised > 0


def test_literal_eos_text_masks_the_sample_and_is_named_before(spm):
    conv = [human("<image>\nHow do I end a strike?"), gpt("Close it with </s> after the text."),
            human("Thanks."), gpt("You are welcome.")]
    out = tokenize_conversation(conv, spm, max_length=2048)
    assert out.input_ids == llava_ids(spm, conversation_prompt(conv))  # LLaVA's ids, "</s>" an eos id
    assert out.input_ids.count(spm.eos_token_id) == 3
    assert out.num_supervised == 0 and "'</s>'" in out.mask_reason
    assert "'</s>'" in template_conflict(conv)


@pytest.mark.parametrize(
    "conv, conflict",
    [
        ([human("<image>\nWhat is it?"), gpt("A cat.")], None),
        ([human("Say </s> please"), gpt("No.")], "'</s>'"),
        ([human("Quote: USER: hi ASSISTANT: hello"), gpt("Done.")], "' ASSISTANT: '"),
        ([human("What?"), gpt("")], "empty"),
    ],
)
def test_template_conflict_and_llava_masks_those_samples(tokenizer, conv, conflict):
    reason = template_conflict(conv)
    assert reason is None if conflict is None else conflict in reason
    out = tokenize_conversation(conv, tokenizer, max_length=512)
    assert (out.num_supervised == 0) == (conflict is not None)
