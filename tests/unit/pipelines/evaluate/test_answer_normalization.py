"""Reading replies: VQAv2 normalisation and accuracy, yes/no and option letters, by hand."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipelines.evaluate.answer_normalization import normalize_vqa_answer, parse_choice, parse_yes_no, vqa_accuracy


def ten(matching: int) -> list[str]:
    """Ten annotators' answers, `matching` of them "cat"."""
    return ["cat"] * matching + ["dog"] * (10 - matching)


@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"),
    ("The dog.", "dog"),
    ("an apple", "apple"),
    ("black-and-white", "black and white"),   # mark inside a word -> space
    ("yes , it is", "yes it is"),              # mark touching a space -> removed
    ("1,000", "1000"),                         # digit,digit -> marks removed
    ("3.5", "3.5"),                            # period before a digit kept
    ("dont know", "don't know"),
    ("isnt", "isn't"),
    ("  Ten\tApples\n", "10 apples"),
    ("its", "its"),                            # a real word: not turned into "it's"
])
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("matching, expected", [
    # Leave each of the 10 annotators out; score min(matches among the other 9 / 3, 1); average.
    (0, 0.0),
    (1, (1 * 0 / 3 + 9 * 1 / 3) / 10),         # = 0.3
    (2, (2 * 1 / 3 + 8 * 2 / 3) / 10),         # = 0.6
    (3, (3 * 2 / 3 + 7 * 1) / 10),             # = 0.9, not 1.0: leaving a matching one out hurts
    (4, (4 * 1 + 6 * 1) / 10),                 # = 1.0
    (10, 1.0),
])
def test_vqa_accuracy_ten_answers(matching, expected):
    assert vqa_accuracy("Cat", ten(matching)) == pytest.approx(expected)


def test_vqa_accuracy_hand_figures():
    assert vqa_accuracy("cat", ten(1)) == pytest.approx(0.3)
    assert vqa_accuracy("cat", ten(2)) == pytest.approx(0.6)
    assert vqa_accuracy("cat", ten(3)) == pytest.approx(0.9)


def test_vqa_accuracy_three_answers_one_match():
    # Out: the match -> 0/3; out: either other -> 1/3. Mean (0 + 1/3 + 1/3) / 3 = 2/9.
    assert vqa_accuracy("two", ["2", "3", "4"]) == pytest.approx(2 / 9)


def test_vqa_accuracy_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("two dogs", ["2"]) == 0.0


@given(st.integers(0, 10), st.integers(0, 10))
def test_vqa_accuracy_bounded_and_monotone(a, b):
    lo, hi = sorted((a, b))
    acc_lo, acc_hi = vqa_accuracy("cat", ten(lo)), vqa_accuracy("cat", ten(hi))
    assert 0.0 <= acc_lo <= acc_hi <= 1.0


@pytest.mark.parametrize("reply, expected", [
    ("Yes, there is a dog in the image.", "yes"),
    ("No, there is no dog.", "no"),
    ("No.", "no"),
    ("There is not a cat. No doubt.", "no"),
    ("Yes. There is no cat behind it.", "yes"),   # only the first sentence is read
    ("I cannot tell", "yes"),                     # LLaVA's rule: anything without no/not is yes
])
def test_parse_yes_no(reply, expected):
    assert parse_yes_no(reply) == expected


@pytest.mark.parametrize("reply, expected", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), (" C ", "C"),
    ("B. A cat", "B"), ("(D) the red one", "D"), ("E) none", "E"),
    ("The answer is B.", "B"), ("Answer: (C)", "C"),
    ("A cat sits on the mat", None),   # the article is not option A
    ("b", None), ("F", None), ("I am not sure", None),
])
def test_parse_choice(reply, expected):
    assert parse_choice(reply) == expected


def test_parse_choice_custom_letters():
    assert parse_choice("F", letters="ABCDEF") == "F"
