"""VQA accuracy, as the official VQAv2 evaluator computes it (GT-Vision-Lab/VQA, ``vqaEval.py``).

An answer earns min(1, matches / 3) against each set of nine of the ten human answers, averaged over the ten
sets; both sides are normalised first (punctuation, number words, articles, contractions), quirks included,
so that a score computed here matches the official one. Pure Python: no torch, no numpy.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The official contractions table, entry for entry. It has a few oddities that we keep on purpose, because
# scores must match the official ones: keys with capitals ("Im", "Ive") never match (answers are lower-cased
# first), and "somebody'd" maps to "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've",
    "hasnt": "hasn't", "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've",
    "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've",
    "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've",
    "youll": "you'll", "youre": "you're", "youve": "you've",
}
# Only zero to ten are spelled out in the official map ("eleven" stays a word).
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Note what is *not* here: the period (handled by _PERIOD_STRIP), the apostrophe (contractions need it),
# the colon, and the percent sign (both survive normalisation in the official evaluator).
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
                ",", "?", "!"]
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")  # a comma between digits: "1,000"
# The official pattern begins with "(?!<=\d)", a typo for the look-behind "(?<!\d)". As written it is a
# look-ahead that always succeeds, so the rule really is "drop every period that is not followed by a digit":
# "3.14" and ".5" keep theirs, "dogs." and "e.g." lose theirs.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
# The official code calls periodStrip.sub("", text, re.UNICODE): re.UNICODE (= 32) lands in the `count`
# argument, so at most 32 periods are removed. We keep that so long outputs score exactly as officially.
_OFFICIAL_PERIOD_COUNT = 32


def _process_punctuation(text: str) -> str:
    """vqaEval.processPunctuation: drop or space out punctuation, then drop periods that end words."""
    has_number_comma = _COMMA_STRIP.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        # Decided on the original text: a mark next to a space ("yes, it is") is simply deleted, a mark inside
        # a word ("x-ray") becomes a space. When the answer holds a number with a comma, every mark is deleted,
        # which is what turns "1,000" into "1000".
        if mark + " " in text or " " + mark in text or has_number_comma:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def _process_digit_article(text: str) -> str:
    """vqaEval.processDigitArticle: lower-case, number words to digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [word for word in words if word not in _ARTICLES]
    words = [_CONTRACTIONS.get(word, word) for word in words]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """Normalise a short answer the way the official VQAv2 evaluator does.

    >>> normalize_answer("Two dogs.")
    '2 dogs'
    >>> normalize_answer("The answer is 1,000!")
    'answer is 1000'
    """
    if not isinstance(text, str):
        raise TypeError(f"normalize_answer expects a string, got {type(text).__name__}: {text!r}")
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(text))


def _as_answer_list(answers: str | Sequence[str], metric: str) -> list[str]:
    """Accept one gold answer as a plain string; refuse empty lists and non-strings with a useful message."""
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError(f"{metric}: the list of gold answers is empty; pass at least one answer string.")
    for answer in answers:
        if not isinstance(answer, str):
            raise TypeError(f"{metric}: gold answers must be strings, got {type(answer).__name__}: {answer!r}")
    return answers


def vqa_accuracy(prediction: str, answers: str | Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers.

    With the usual 10 answers this is the official score: for each of the 10 ways of leaving one annotator
    out, min(#remaining annotators who gave the prediction / 3, 1), averaged. So 1 matching human -> 0.3,
    2 -> 0.6, 3 -> 0.9, 4 or more -> 1.0.

    With a single answer (most the_cauldron rows) leave-one-out would always give 0, so it is exact match
    after normalisation. Any other number n >= 2 of answers uses the same leave-one-out formula over n
    subsets of n - 1 answers (e.g. 5 answers of which 3 match -> (3 * 2/3 + 2 * 1) / 5 = 0.8).

    Both sides are normalised with `normalize_answer`. (The official script only punctuation-processes
    the gold side, because VQAv2's annotation files already hold normalised answers; normalising both
    sides gives the same scores on them and also works for raw gold answers.)
    """
    gold = [normalize_answer(answer) for answer in _as_answer_list(answers, "vqa_accuracy")]
    predicted = normalize_answer(prediction)
    if len(gold) == 1:
        return float(predicted == gold[0])
    scores = []
    for left_out in range(len(gold)):
        matches = sum(answer == predicted for i, answer in enumerate(gold) if i != left_out)
        scores.append(min(1.0, matches / 3))
    return sum(scores) / len(scores)
