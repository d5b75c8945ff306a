"""VQA answer normalisation (the EvalAI rules) and the leave-one-out VQA accuracy.

TextVQA numbers in papers come from LLaVA's `m4c_evaluator.py`, which uses EvalAI's answer
processor. Its quirks are part of the metric, so they are reproduced here on purpose:

- commas and question marks are deleted before anything else, so "1,000" becomes "1000" and the
  comma-between-digits rule of the punctuation step can no longer fire;
- the period rule deletes every "." that is not followed by a digit ("3.5" survives, "end." does
  not), at most 32 times per answer (the official call passes `re.UNICODE` where `count` goes);
- contraction keys with capitals ("Im", "Ive", "Id've") can never match the lower-cased text, so
  "im" stays "im"; they are left out of the table below for that reason.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Missing-apostrophe spellings and what they are restored to (EvalAI's table, lower-case keys only).
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES = frozenset({"a", "an", "the"})

# Characters the punctuation step deletes or turns into spaces; note "." and "'" are not among them.
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]

COMMA_BETWEEN_DIGITS = re.compile(r"(?<=\d),+(?=\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
MAX_PERIODS_REMOVED = 32

# How many human answers must agree for full credit.
AGREEMENT_FOR_FULL_CREDIT = 3


def tokenize_like_evalai(text: str) -> str:
    """Lower-case, drop commas and question marks, split off possessive 's, flatten newlines and tabs."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    return text.replace("\n", " ").replace("\t", " ").strip()


def strip_punctuation(text: str) -> str:
    """Delete a punctuation mark where it touches a space (or digits carry commas), else turn it into a space.

    The decision for each mark looks at the text as it came in, while the edits accumulate.
    """
    has_number_commas = COMMA_BETWEEN_DIGITS.search(text) is not None
    result = text
    for mark in PUNCTUATION:
        if mark + " " in text or " " + mark in text or has_number_commas:
            result = result.replace(mark, "")
        else:
            result = result.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", result, count=MAX_PERIODS_REMOVED)


def normalize_words(text: str) -> str:
    """Number words to digits, articles dropped, missing apostrophes restored."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in ARTICLES]
    return " ".join(CONTRACTIONS.get(word, word) for word in words)


def normalize_answer(answer: str) -> str:
    """The EvalAI normal form of an answer: what predictions and human answers are compared in."""
    return normalize_words(strip_punctuation(tokenize_like_evalai(answer)))


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers (normally ten).

    Each human answer is left out in turn; the prediction earns min(1, matches among the others / 3)
    and the earnings are averaged. With ten answers, 4+ matches give 1.0, 3 give 0.9, 2 give 0.6,
    1 gives 0.3.
    """
    if len(human_answers) == 0:
        raise ValueError("vqa_accuracy needs at least one human answer; the annotation entry has none.")
    predicted = normalize_answer(prediction)
    normalized = [normalize_answer(answer) for answer in human_answers]
    total_matches = sum(answer == predicted for answer in normalized)
    credit = 0.0
    for answer in normalized:
        matches_among_others = total_matches - (answer == predicted)
        credit += min(1.0, matches_among_others / AGREEMENT_FOR_FULL_CREDIT)
    return credit / len(normalized)
