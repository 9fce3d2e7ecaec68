"""The vicuna_v1 conversation template of LLaVA-1.5: prompt text, token ids and training labels.

Prompt text of a conversation (LLaVA's SeparatorStyle.TWO, separators " " and "</s>"):

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>...

In `input_ids` the `<image>` tag becomes one IMAGE_TOKEN_INDEX entry, which the model later replaces
by the image's visual tokens. Labels are IGNORE_INDEX everywhere but the assistant replies and their
"</s>", which are the input ids themselves (the model shifts them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

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

    @property
    def num_supervised(self) -> int:
        """Positions that take a loss; a sample with 0 teaches nothing and should be skipped."""
        return sum(label != IGNORE_INDEX for label in self.labels)


def _pairs(conversations: Conversation) -> list[tuple[str, str]]:
    """Check LLaVA's turn structure and return (question, reply) pairs; raise ValueError if bad."""
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
            raise ValueError(
                f"the first human turn has {images} {IMAGE_TOKEN} tags; at most one is supported"
            )
    if len(conversations) % 2:
        raise ValueError("conversation ends with a human turn that has no reply")
    values = [turn["value"] for turn in conversations]
    return list(zip(values[0::2], values[1::2]))


def _user_part(question: str) -> str:
    """'USER: {q} ASSISTANT:' — the masked part of a round, up to the reply's leading space."""
    return f"{USER_ROLE}: {question}{SEP}{ASSISTANT_ROLE}:"


def conversation_prompt(conversations: Conversation) -> str:
    """The whole conversation as vicuna_v1 prompt text, `<image>` left in place."""
    rounds = "".join(f"{_user_part(q)} {a}{SEP2}" for q, a in _pairs(conversations))
    return SYSTEM_PROMPT + SEP + rounds


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No special tokens: BOS is added once by the caller, whatever the tokenizer's post-processor does.
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _encode_with_image(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of text with each `<image>` as one IMAGE_TOKEN_INDEX (no BOS)."""
    chunks = text.split(IMAGE_TOKEN)
    ids = _encode(tokenizer, chunks[0])
    for chunk in chunks[1:]:
        ids += [IMAGE_TOKEN_INDEX, *_encode(tokenizer, chunk)]
    return ids


def _bos(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    return [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]


def tokenize_conversation(
    conversations: Conversation,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    num_visual_tokens: int = 0,
) -> TokenizedConversation:
    """Token ids and labels of a LLaVA conversation in the vicuna_v1 template.

    Each segment (masked prompt text, the image, each reply + "</s>") is tokenized on its own and
    the results concatenated, so label boundaries fall exactly between segments. A reply's segment
    is " {reply}" (the space of "ASSISTANT: ") followed by the eos id: at inference the prompt ends
    in "ASSISTANT:", so the model must learn to emit that space. The sequence is cut from the end so
    that its length, counting the placeholder as num_visual_tokens positions, is at most
    max_length; the visual tokens are never split: if they do not fit, the image and everything
    after it are dropped and `image_cut` is set. Raises ValueError on a malformed conversation.
    """
    if max_length < 1 or num_visual_tokens < 0:
        raise ValueError(
            f"need max_length >= 1 and num_visual_tokens >= 0, got {max_length}, {num_visual_tokens}"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the replies with")
    input_ids = _bos(tokenizer)
    labels = [IGNORE_INDEX] * len(input_ids)
    prefix = SYSTEM_PROMPT + SEP  # masked text waiting to be joined to the first user turn
    for question, reply in _pairs(conversations):
        masked = _encode_with_image(tokenizer, prefix + _user_part(question))
        prefix = ""
        input_ids += masked
        labels += [IGNORE_INDEX] * len(masked)
        supervised = _encode(tokenizer, " " + reply) + [tokenizer.eos_token_id]
        input_ids += supervised
        labels += supervised

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
    return TokenizedConversation(input_ids, labels, image_position, truncated, image_cut)


def generation_prompt(question: str, with_image: bool) -> str:
    """Inference prompt: system, the question as the user turn, and "ASSISTANT:" to answer after."""
    if IMAGE_TOKEN in question:
        raise ValueError(f"the question already holds {IMAGE_TOKEN}; pass it without the tag")
    image = IMAGE_TOKEN + "\n" if with_image else ""
    return SYSTEM_PROMPT + SEP + _user_part(image + question)


def tokenize_prompt(prompt: str, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """BOS + the prompt's token ids, each `<image>` as one IMAGE_TOKEN_INDEX."""
    return _bos(tokenizer) + _encode_with_image(tokenizer, prompt)


def trim_text(conversations: Conversation, mode: TrimTextMode) -> str:
    """The text TRIM scores the image patches against, before CLIP's own truncation.

    "questions": the human turns joined by a space; "first_question": the first human turn;
    "conversation": the whole templated conversation (what the released TRIM code uses in
    training). `<image>` is removed and surrounding whitespace stripped in every mode.
    """
    pairs = _pairs(conversations)
    if mode == "questions":
        questions = (q.replace(IMAGE_TOKEN, "").strip() for q, _ in pairs)
        return " ".join(q for q in questions if q)
    if mode == "first_question":
        return pairs[0][0].replace(IMAGE_TOKEN, "").strip()
    if mode == "conversation":
        return conversation_prompt(conversations).replace(IMAGE_TOKEN, "").strip()
    raise ValueError(f"unknown trim_text mode {mode!r}; expected questions, first_question or conversation")
