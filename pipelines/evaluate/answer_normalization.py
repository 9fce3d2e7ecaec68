"""Reading LLaVA's replies: VQAv2's answer normalisation and accuracy, POPE's yes/no, option letters.

Pure string functions, used by pipelines/evaluate/scoring.py (which joins answers with annotations).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

DEFAULT_LETTERS = "ABCDE"
"""Option letters accepted by default (ScienceQA has up to five options, MMBench up to four)."""


# ------------------------------------------------------------------------------------------------
# VQAv2 answer normalisation (the rules of the official VQA evaluation, written out here)
# ------------------------------------------------------------------------------------------------

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                "@", "`", ",", "?", "!")
# The official period rule intends "a period not between digits" but, as written, only checks the
# next character; we keep its actual behaviour: a period not followed by a digit is dropped.
_PERIOD = re.compile(r"\.(?!\d)")
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
                 "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})

# Canonical contractions; every spelling with some of the apostrophes dropped maps to them.
# Contractions that lose to an ordinary word without the apostrophe (i'll/ill, we're/were, it's/its,
# we'll/well, i'd/id, ...) are not listed, so normalisation never rewrites a real word.
_CONTRACTIONS = (
    "ain't", "aren't", "can't", "could've", "couldn't", "couldn't've", "didn't", "doesn't", "don't",
    "hadn't", "hadn't've", "hasn't", "haven't", "he'd", "he'd've", "he's", "how'd", "how'll",
    "how's", "i'd've", "i'm", "i've", "isn't", "it'd", "it'd've", "it'll", "let's", "ma'am",
    "mightn't", "mightn't've", "might've", "mustn't", "must've", "needn't", "not've", "o'clock",
    "oughtn't", "shan't", "she'd", "she'd've", "she's", "should've", "shouldn't", "shouldn't've",
    "somebody'd", "somebody'd've", "somebody'll", "somebody's", "someone'd", "someone'd've",
    "someone'll", "someone's", "something'd", "something'd've", "something'll", "that's", "there'd",
    "there'd've", "there're", "there's", "they'd", "they'd've", "they'll", "they're", "they've",
    "'twas", "wasn't", "we'd've", "we've", "weren't", "what'll", "what're", "what's", "what've",
    "when's", "where'd", "where's", "where've", "who'd", "who'd've", "who'll", "who's", "who've",
    "why'll", "why're", "why's", "won't", "would've", "wouldn't", "wouldn't've", "y'all",
    "y'all'll", "y'all'd've", "you'd", "you'd've", "you'll", "you're", "you've",
)
_REAL_WORDS = frozenset({"shed", "lets"})
"""Apostrophe-less spellings that are ordinary words; never rewritten."""


def _apostrophe_variants(word: str) -> set[str]:
    """All spellings of `word` with any subset of its apostrophes removed (word itself excluded)."""
    parts = word.split("'")
    variants = {parts[0]}
    for part in parts[1:]:
        variants = {v + sep + part for v in variants for sep in ("", "'")}
    variants.discard(word)
    return variants


def _build_contraction_map() -> dict[str, str]:
    table: dict[str, str] = {}
    for canonical in _CONTRACTIONS:
        for variant in _apostrophe_variants(canonical):
            if variant not in _REAL_WORDS:
                table[variant] = canonical
    return table


_CONTRACTION_MAP = _build_contraction_map()


def _normalise_punctuation(text: str) -> str:
    # A mark touching a space (or any "1,000"-style number in the text) is deleted; one inside a
    # word becomes a space ("black-and-white" -> "black and white"), as the official evaluation
    # does.
    out = text
    glued_number = _DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in _PUNCTUATION:
        if glued_number or (mark + " ") in text or (" " + mark) in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD.sub("", out)


def _normalise_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTION_MAP.get(word, word))
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an open-ended answer as VQAv2 does: whitespace, punctuation, lowercase, number
    words to digits ("two" -> "2"), articles dropped, apostrophe-less contractions restored."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _normalise_words(_normalise_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the reference answers.

    With several answers: for each annotator, min(#other annotators giving the prediction / 3, 1),
    averaged over the annotators (the official leave-one-out averaging); so with ten answers, 4+
    matches score 1.0, 3 -> 0.9, 2 -> 0.6, 1 -> 0.3. With one answer: exact match after
    normalisation. Both sides are always normalised (the official script skips normalisation when
    all ten answers agree; normalising anyway only forgives formatting).
    """
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    refs = [normalize_vqa_answer(a) for a in answers]
    if len(refs) == 1:
        return float(pred == refs[0])
    matches = sum(ref == pred for ref in refs)
    total = 0.0
    for ref in refs:
        # Leaving this annotator out removes one match if it agreed with the prediction.
        others = matches - (ref == pred)
        total += min(others / 3.0, 1.0)
    return total / len(refs)


# ------------------------------------------------------------------------------------------------
# Reply parsers
# ------------------------------------------------------------------------------------------------


def parse_yes_no(text: str) -> str:
    """Read "yes" or "no" from a reply as LLaVA's POPE evaluation does: keep the first sentence,
    drop commas, and answer "no" if the words include "No", "no" or "not", else "yes"."""
    first = text.split(".", 1)[0].replace(",", "")
    words = first.split(" ")
    return "no" if ("No" in words or "no" in words or "not" in words) else "yes"


def parse_choice(text: str, letters: str = DEFAULT_LETTERS) -> str | None:
    """The option letter in a reply, or None when it cannot be read.

    Accepted: the bare letter ("B", "B.", "(B)"), a leading letter marked as an option ("B. cat",
    "(B) cat", "B) cat", "B: cat") and "answer is B" / "Answer: (B)". Letters are upper case only,
    so the article in "A cat sits" is not read as option A.
    """
    allowed = re.escape(letters)
    reply = text.strip()
    bare = re.fullmatch(rf"\(?([{allowed}])\)?[.:)]?", reply)
    if bare:
        return bare.group(1)
    lead = re.match(rf"(?:\(([{allowed}])\)|([{allowed}])[.:)])(?:\s|$)", reply)
    if lead:
        return lead.group(1) or lead.group(2)
    stated = re.findall(rf"answer\s*(?:is|:)?\s*:?\s*\(?([{allowed}])\)?(?![A-Za-z])", reply,
                        flags=re.IGNORECASE)
    # re.IGNORECASE also loosens the letter class; keep only upper-case hits.
    stated = [s for s in stated if s in letters]
    if len(set(stated)) == 1:
        return stated[0]
    return None
