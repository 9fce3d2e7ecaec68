"""The vicuna_v1 conversation template of LLaVA-1.5: prompt text, token ids and training labels,
built as haotian-liu/LLaVA builds them (train.py `preprocess_multimodal` and `preprocess_v1`,
mm_utils.py `tokenizer_image_token`, conversation.py `conv_vicuna_v1`).

1. In an image record the `<image>` tag leaves the first human turn and goes in front of it:
   "<image>\\n" + the rest stripped (mm_use_im_start_end off, as in LLaVA-1.5).
2. Prompt text (SeparatorStyle.TWO): messages are not stripped; an empty one is written "ROLE:"
   with no separator after it:

       {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

3. input_ids: BOS, then the prompt split at `<image>`, each chunk tokenized on its own, one
   IMAGE_TOKEN_INDEX between chunks; the "</s>" separators become the eos id.
4. labels: LLaVA's round arithmetic. The prompt is split at "</s>" into rounds and each round at
   " ASSISTANT: "; a round counts as many ids as it has tokenized alone with BOS (the BOS stands for
   the "</s>" the split removed), its instruction that many minus 2 (BOS and the token of the space
   after "ASSISTANT:"); after the first round both are one less when `tokenizer.legacy` is False
   (such tokenizers put no "▁" before the "USER" that follows "</s>"). Instructions are masked,
   the rest of each round (the reply and its "</s>") is supervised. When the rounds add up to less
   than max_length but not to the sequence length, LLaVA masks the whole sample ("tokenization
   mismatch"); so do we, with a warning and `mask_reason` set.
5. A literal "</s>" inside a message splits a round in two, so LLaVA's labels no longer follow the
   turns (it usually ends in a mismatch). We keep LLaVA's input_ids and always mask such a sample
   whole; `template_conflict` names it (and the other texts that break the split) before
   tokenization, so the shard stage can set the record aside with a reason.

Deliberate differences: BOS is prepended here and text tokenized without special tokens, which is
what a Llama tokenizer's `tokenizer(text)` gives and also gives tokenizers without a BOS
post-processor one; a tokenizer without a `legacy` attribute counts as legacy (LLaVA would fail);
visual tokens count toward max_length and are never cut (see tokenize_conversation), where LLaVA
cuts the spliced sequence at model_max_length wherever it falls; records LLaVA would reshape (several
`<image>` tags, a tag after the first turn, a first turn from gpt) are refused with ValueError (the
shard stage drops a first turn from gpt before, as LLaVA's preprocess does: pipelines/shard/records.py).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
USER_ROLE = "USER"
ASSISTANT_ROLE = "ASSISTANT"
SEP = " "
"""After the system prompt and after each user turn."""
SEP2 = "</s>"
"""After each assistant reply; tokenized as the tokenizer's eos id."""
REPLY_SEP = SEP + ASSISTANT_ROLE + ": "
"""Where LLaVA splits a round into instruction and reply."""

IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200
"""LLaVA's placeholder id for the image in input_ids."""
IGNORE_INDEX = -100
"""Label of positions that take no loss (PyTorch cross-entropy's default ignore_index)."""

TrimTextMode = Literal["questions", "first_question", "conversation"]

Conversation = Sequence[Mapping[str, str]]
"""LLaVA's `conversations`: [{"from": "human" | "gpt", "value": str}, ...]."""


@dataclass
class TokenizedConversation:
    """A conversation as token ids and labels, ready for the collator."""

    input_ids: list[int]
    """Token ids, BOS first, with at most one IMAGE_TOKEN_INDEX placeholder."""
    labels: list[int]
    """Same length as input_ids: the id where supervised, IGNORE_INDEX elsewhere."""
    image_position: int | None
    """Index of the placeholder in input_ids; None for text-only samples or if the image was cut."""
    truncated: bool
    """True if tokens were dropped from the end to fit max_length."""
    image_cut: bool = False
    """True if the image had to be dropped because its visual tokens would not fit."""
    mask_reason: str | None = None
    """Why every label is IGNORE_INDEX, as LLaVA would leave it (rounds that do not add up, a literal
    "</s>" in a message); None when the sample was masked normally."""

    @property
    def num_supervised(self) -> int:
        """Positions that take a loss; a sample with 0 teaches nothing and should be skipped."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _values(conversations: Conversation) -> list[str]:
    """Check LLaVA's turn structure, raise ValueError if bad; the turns' values after LLaVA's
    preprocess_multimodal (the image tag moved to the front of the first turn)."""
    if not conversations:
        raise ValueError("conversation is empty")
    for i, turn in enumerate(conversations):
        if not isinstance(turn, Mapping) or not isinstance(turn.get("value"), str):
            raise ValueError(f"turn {i} is not a {{'from': ..., 'value': str}} mapping")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn.get("from") != expected:
            raise ValueError(
                f"turn {i} is from {turn.get('from')!r}, expected {expected!r} "
                "(turns must alternate human, gpt, starting with human)"
            )
        images = turn["value"].count(IMAGE_TOKEN)
        if images and i != 0:
            raise ValueError(f"turn {i} has an {IMAGE_TOKEN} tag; only the first human turn may")
        if images > 1:
            raise ValueError(f"the first human turn has {images} {IMAGE_TOKEN} tags; at most one is supported")
    if len(conversations) % 2:
        raise ValueError("conversation ends with a human turn that has no reply")
    values = [turn["value"] for turn in conversations]
    if IMAGE_TOKEN in values[0]:
        # The outer strip matters when nothing but the tag was there: the value is then "<image>".
        values[0] = (IMAGE_TOKEN + "\n" + values[0].replace(IMAGE_TOKEN, "").strip()).strip()
    return values


def _prompt(values: Sequence[str]) -> str:
    """LLaVA's Conversation.get_prompt for SeparatorStyle.TWO."""
    text = SYSTEM_PROMPT + SEP
    for i, value in enumerate(values):
        role, sep = (USER_ROLE, SEP) if i % 2 == 0 else (ASSISTANT_ROLE, SEP2)
        text += f"{role}: {value}{sep}" if value else f"{role}:"
    return text


def conversation_prompt(conversations: Conversation) -> str:
    """The whole conversation as LLaVA's vicuna_v1 prompt text, `<image>` (moved to the front of the
    first turn) left in."""
    return _prompt(_values(conversations))


def template_conflict(conversations: Conversation) -> str | None:
    """Why LLaVA's labels cannot follow this conversation's turns, or None: the prompt must split
    back at "</s>" and " ASSISTANT: " into exactly its rounds. Raises ValueError if malformed."""
    values = _values(conversations)
    if any(SEP2 in value for value in values):
        return f"a message contains the reply separator {SEP2!r}"
    rounds = _prompt(values).split(SEP2)
    if rounds[-1] or len(rounds) != len(values) // 2 + 1 or any(r.count(REPLY_SEP) != 1 for r in rounds[:-1]):
        return f"a message is empty or contains {REPLY_SEP!r}, so the template's rounds do not split back"
    return None


def _encode(tokenizer: PreTrainedTokenizerBase, text: str, known: dict[str, list[int]] | None = None) -> list[int]:
    if not text:
        return []
    if known is not None and text in known:
        return known[text]
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_all(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> dict[str, list[int]]:
    """Each distinct non-empty text's ids from one tokenizer call: a call costs ~0.1 ms of Python
    whatever its length, and a conversation needs six or more (the same ids as one call each)."""
    unique = list(dict.fromkeys(t for t in texts if t))
    if not unique:
        return {}
    return {t: list(ids) for t, ids in zip(unique, tokenizer(unique, add_special_tokens=False)["input_ids"])}


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def _image_token_ids(tokenizer: PreTrainedTokenizerBase, text: str,
                     known: dict[str, list[int]] | None = None) -> list[int]:
    """LLaVA's tokenizer_image_token: BOS + each chunk between `<image>` tags tokenized on its own
    (so each gets the tokenizer's leading "▁" where it adds one), IMAGE_TOKEN_INDEX between them.
    known: ids of chunks encoded beforehand (_encode_all)."""
    chunks = text.split(IMAGE_TOKEN)
    ids = _bos(tokenizer) + _encode(tokenizer, chunks[0], known)
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *_encode(tokenizer, chunk, known)]
    return ids


def _mask(labels: list[int], start: int, stop: int) -> None:
    # torch's target[start:stop] = IGNORE_INDEX, which LLaVA uses: out-of-range parts do nothing.
    for i in range(max(start, 0), min(stop, len(labels))):
        labels[i] = IGNORE_INDEX


def _rounds(prompt: str) -> list[tuple[str, str]]:
    """(round text, its instruction up to and with the reply separator) of each round preprocess_v1
    masks, in order."""
    rounds = []
    for text in prompt.split(SEP2):
        parts = text.split(REPLY_SEP)
        if text == "" or len(parts) != 2:
            break
        rounds.append((text, parts[0] + REPLY_SEP))
    return rounds


def _round_labels(tokenizer: PreTrainedTokenizerBase, prompt: str, input_ids: list[int], max_length: int,
                  known: dict[str, list[int]] | None = None) -> tuple[list[int], str | None]:
    """preprocess_v1's masking of input_ids: the labels and, if they were all masked for a
    mismatch, why."""
    labels = list(input_ids)
    not_legacy = not getattr(tokenizer, "legacy", True)
    cur_len = 1
    _mask(labels, 0, cur_len)
    for i, (text, instruction) in enumerate(_rounds(prompt)):
        round_len = len(_image_token_ids(tokenizer, text, known))
        instruction_len = len(_image_token_ids(tokenizer, instruction, known)) - 2
        if i != 0 and not_legacy:
            round_len -= 1
            instruction_len -= 1
        _mask(labels, cur_len, cur_len + instruction_len)
        cur_len += round_len
    _mask(labels, cur_len, len(labels))
    # LLaVA's v1 recipe pads with unk and counts the non-pad ids: an unk inside the text counts out.
    unk = tokenizer.unk_token_id  # read once: a tokenizer attribute costs a lookup through transformers
    total_len = sum(token != unk for token in input_ids)
    if cur_len < max_length and cur_len != total_len:
        return [IGNORE_INDEX] * len(labels), f"tokenization mismatch: {cur_len} vs. {total_len}"
    return labels, None


def tokenize_conversation(
    conversations: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_visual_tokens: int = 0,
) -> TokenizedConversation:
    """Token ids and labels of a LLaVA conversation in the vicuna_v1 template, as LLaVA-1.5 makes
    them (see the module docstring).

    Then the sequence is cut from the end so that its length, counting the placeholder as
    num_visual_tokens positions, is at most max_length; the visual tokens are never split: if they
    do not fit, the image and everything after it are dropped and `image_cut` is set. Raises
    ValueError on a malformed conversation or a tokenizer without bos or eos token.
    """
    if max_length < 1 or num_visual_tokens < 0:
        raise ValueError(
            f"need max_length >= 1 and num_visual_tokens >= 0, got {max_length}, {num_visual_tokens}"
        )
    if tokenizer.eos_token_id is None or tokenizer.bos_token_id is None:
        raise ValueError("LLaVA's template needs a tokenizer with a bos and an eos token")
    values = _values(conversations)
    prompt = _prompt(values)
    conflict = any(SEP2 in value for value in values)
    pieces = [prompt] + ([] if conflict else [text for pair in _rounds(prompt) for text in pair])
    known = _encode_all(tokenizer, [chunk for piece in pieces for chunk in piece.split(IMAGE_TOKEN)])
    input_ids = _image_token_ids(tokenizer, prompt, known)
    reason: str | None
    if conflict:
        labels, reason = [IGNORE_INDEX] * len(input_ids), f"a message contains {SEP2!r}"
    else:
        labels, reason = _round_labels(tokenizer, prompt, input_ids, max_length, known)
    if reason:
        logger.warning("%s; the sample takes no loss (as in LLaVA)", reason)

    image_position = input_ids.index(IMAGE_TOKEN_INDEX) if IMAGE_TOKEN_INDEX in input_ids else None
    extra = 0 if image_position is None else num_visual_tokens - 1
    truncated = len(input_ids) + extra > max_length
    image_cut = False
    if truncated:
        if image_position is not None and image_position + num_visual_tokens > max_length:
            # Cutting inside the visual tokens would leave a partial image: drop it whole.
            keep = min(image_position, max_length)
            image_position, image_cut = None, True
        else:
            keep = max_length - (0 if image_position is None else extra)
        input_ids, labels = input_ids[:keep], labels[:keep]
    return TokenizedConversation(input_ids, labels, image_position, truncated, image_cut, reason)


def generation_prompt(question: str, with_image: bool) -> str:
    """Inference prompt: system, the question as the user turn, and "ASSISTANT:" to answer after."""
    if IMAGE_TOKEN in question:
        raise ValueError(f"the question already holds {IMAGE_TOKEN}; pass it without the tag")
    image = IMAGE_TOKEN + "\n" if with_image else ""
    return _prompt([image + question, ""])


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """BOS + the prompt's token ids, each `<image>` as one IMAGE_TOKEN_INDEX (tokenizer_image_token)."""
    return _image_token_ids(tokenizer, prompt)


def trim_text(conversations: Conversation, mode: TrimTextMode) -> str:
    """The text TRIM scores the image patches against, before CLIP's own truncation.

    "questions": the human turns joined by a space; "first_question": the first human turn;
    "conversation": the whole templated conversation, image tag moved to the front as in training
    (what the released TRIM code uses). `<image>` is removed and surrounding whitespace stripped in
    every mode. TRIM's code replaces the tag by a space and strips nothing; that differs only in
    whitespace, which CLIP's tokenizer collapses and drops, so CLIP sees the same tokens.
    """
    values = _values(conversations)
    if mode == "questions":
        questions = (q.replace(IMAGE_TOKEN, "").strip() for q in values[0::2])
        return " ".join(q for q in questions if q)
    if mode == "first_question":
        return values[0].replace(IMAGE_TOKEN, "").strip()
    if mode == "conversation":
        return _prompt(values).replace(IMAGE_TOKEN, "").strip()
    raise ValueError(f"unknown trim_text mode {mode!r}; expected questions, first_question or conversation")
