"""Lesson 06, evaluation: normalize_answer, vqa_accuracy, mmstar_match, levenshtein, anls.

References are the scorers of vlm_course.evaluation, which reproduce the official ones quirks included
(VQAv2's vqaEval.py, lmms-eval's MMStar `exact_match`, DocVQA's ANLS script), so the checks hold a
learner to the numbers a paper would report. Mutants are the mistakes learners actually make.

The learner's vqa_accuracy calls the learner's normalize_answer, and anls the learner's levenshtein (they
share the notebook's namespace), so a stub helper is reported as "not implemented yet (... helper ...)".
"""

from __future__ import annotations

import re
import string

from ... import evaluation as ev
from ..core import Case, Exercise, Mutant
from ..registry import register

LESSON = "06"

# ----------------------------------------------------------------------------------------------
# normalize_answer(text) -> str: the official VQAv2 normalisation


def normalize_answer(text: str) -> str:
    return ev.normalize_answer(text)


def _digit_article(text: str, numbers: bool = True, articles: bool = True, contractions: bool = True,
                   lower: bool = True) -> str:
    words = (text.lower() if lower else text).split()
    if numbers:
        words = [ev._NUMBER_WORDS.get(w, w) for w in words]
    if articles:
        words = [w for w in words if w not in ev._ARTICLES]
    if contractions:
        words = [ev._CONTRACTIONS.get(w, w) for w in words]
    return " ".join(words)


def _official_punctuation(text: str) -> str:
    return ev._process_punctuation(text.replace("\n", " ").replace("\t", " ").strip())


def normalize_no_number_words(text):
    return _digit_article(_official_punctuation(text), numbers=False)


def normalize_articles_kept(text):
    return _digit_article(_official_punctuation(text), articles=False)


def normalize_no_contractions(text):
    return _digit_article(_official_punctuation(text), contractions=False)


def normalize_no_lowercase(text):
    return _digit_article(_official_punctuation(text), lower=False)


def normalize_strip_all_punctuation(text):
    """The usual shortcut: delete every punctuation mark (string.punctuation), which also eats '3.5' and 'x-ray'."""
    return _digit_article(text.translate(str.maketrans("", "", string.punctuation)))


def normalize_number_words_everywhere(text):
    """A number map that goes beyond the official one (eleven, twelve, ...) or forgets 'none'."""
    extra = {"eleven": "11", "twelve": "12", "none": "none"}
    words = [extra.get(w, w) for w in _official_punctuation(text).lower().split()]
    return _digit_article(" ".join(words))


def normalize_articles_as_substrings(text):
    """Articles removed with str.replace, which also eats them inside words ('ball' -> 'bll')."""
    lowered = _official_punctuation(text).lower().replace("the", "").replace("an", "").replace(" a ", " ")
    return _digit_article(lowered, articles=False)


def normalize_no_punctuation(text):
    """Every step but the punctuation one."""
    return _digit_article(text.replace("\n", " ").replace("\t", " ").strip())


register(Exercise(
    name="normalize_answer", lesson=LESSON, reference=normalize_answer,
    description="the official VQAv2 answer normalisation",
    cases=[
        Case("'Two dogs.' (number words, final period)", lambda: ("Two dogs.",)),
        Case("'The red ball' (articles)", lambda: ("The red ball",)),
        Case("'An apple and a pear' (articles in the middle)", lambda: ("An apple and a pear",)),
        Case("'YES' (case)", lambda: ("YES",)),
        Case("'dont know' (contractions)", lambda: ("dont know",)),
        Case("'1,000' (comma inside a number)", lambda: ("1,000",)),
        Case("'x-ray' (a mark inside a word becomes a space)", lambda: ("x-ray",)),
        Case("'yes, it is' (a mark next to a space is deleted)", lambda: ("yes, it is",)),
        Case("'3.5 inches' (a period before a digit stays)", lambda: ("3.5 inches",)),
        Case("'none of the eleven' (only none/zero..ten are number words)", lambda: ("none of the eleven",)),
        Case("'Red\\nand blue' (newline)", lambda: ("Red\nand blue",)),
    ],
    mutants=[
        Mutant("no_number_words", normalize_no_number_words,
               "number words were not turned into digits: 'two' must become '2' (the map covers none/zero..ten)"),
        Mutant("articles_kept", normalize_articles_kept, "articles were kept: drop the words 'a', 'an' and 'the'"),
        Mutant("no_contractions", normalize_no_contractions,
               "contractions were not restored: map each word through CONTRACTIONS ('dont' -> \"don't\")"),
        Mutant("no_lowercase", normalize_no_lowercase, "the answer was not lower-cased"),
        Mutant("strip_all_punctuation", normalize_strip_all_punctuation,
               "every punctuation mark was deleted - use process_punctuation: 'x-ray' becomes 'x ray' and "
               "'3.5' keeps its period"),
        Mutant("number_words_beyond_ten", normalize_number_words_everywhere,
               "the official number map is exactly none/zero/one..ten -> digits: 'none' becomes '0', 'eleven' "
               "stays a word"),
        Mutant("articles_as_substrings", normalize_articles_as_substrings,
               "articles were removed as substrings, which also cuts them out of words ('and' loses its 'an') - "
               "drop whole words: 'a', 'an', 'the'"),
        Mutant("no_punctuation", normalize_no_punctuation,
               "punctuation was not processed: 'dogs.' must become 'dogs' and 'x-ray' 'x ray' (process_punctuation "
               "comes first, then the word-level steps)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# vqa_accuracy(prediction, answers) -> float


def vqa_accuracy(prediction, answers) -> float:
    return ev.vqa_accuracy(prediction, answers)


def _gold(answers):
    return [ev.normalize_answer(a) for a in ([answers] if isinstance(answers, str) else answers)]


def vqa_exact_match(prediction, answers):
    return float(ev.normalize_answer(prediction) in _gold(answers))


def vqa_min_over_all(prediction, answers):
    gold = _gold(answers)
    return min(1.0, sum(a == ev.normalize_answer(prediction) for a in gold) / 3)


def vqa_single_answer_zero(prediction, answers):
    gold, predicted = _gold(answers), ev.normalize_answer(prediction)
    scores = [min(1.0, sum(a == predicted for j, a in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def vqa_not_normalised(prediction, answers):
    gold = [answers] if isinstance(answers, str) else list(answers)
    if len(gold) == 1:
        return float(prediction == gold[0])
    scores = [min(1.0, sum(a == prediction for j, a in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def vqa_gold_not_normalised(prediction, answers):
    """Normalises the prediction only: VQAv2's own files hold normalised answers, raw gold answers do not."""
    gold = [answers] if isinstance(answers, str) else list(answers)
    predicted = ev.normalize_answer(prediction)
    if len(gold) == 1:
        return float(predicted == gold[0])
    scores = [min(1.0, sum(a == predicted for j, a in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def vqa_prediction_not_normalised(prediction, answers):
    gold = _gold(answers)
    if len(gold) == 1:
        return float(prediction == gold[0])
    scores = [min(1.0, sum(a == prediction for j, a in enumerate(gold) if j != i) / 3) for i in range(len(gold))]
    return sum(scores) / len(scores)


def _humans(*counts: tuple[str, int]) -> list[str]:
    return [answer for answer, n in counts for _ in range(n)]


register(Exercise(
    name="vqa_accuracy", lesson=LESSON, reference=vqa_accuracy,
    description="VQA accuracy: leave-one-out average of min(#matching humans / 3, 1)",
    cases=[
        Case("10 answers, 1 human agrees", lambda: ("cat", _humans(("cat", 1), ("dog", 9)))),
        Case("10 answers, 3 humans agree after normalising: 'Yes' vs 2 'Yes', 1 'yes' and 7 'no' (normalise both "
             "sides)", lambda: ("Yes", _humans(("Yes", 2), ("yes", 1), ("no", 7)))),
        Case("10 answers, 5 humans agree", lambda: ("red", _humans(("red", 5), ("maroon", 5)))),
        Case("10 answers, nobody agrees", lambda: ("blue", _humans(("red", 6), ("maroon", 4)))),
        Case("'Two' against two humans who wrote '2' (normalise both sides)",
             lambda: ("Two", _humans(("2", 2), ("3", 8)))),
        Case("one gold answer as a string: 'yes' vs 'Yes.' (the gold answer needs normalising too)",
             lambda: ("yes", "Yes.")),
        Case("one gold answer in a list: 'no' vs ['yes']", lambda: ("no", ["yes"])),
        Case("one gold answer in a list: 'a dog' vs ['dog']", lambda: ("a dog", ["dog"])),
        Case("5 answers, 3 agree", lambda: ("left", _humans(("left", 3), ("right", 2)))),
    ],
    mutants=[
        Mutant("exact_match", vqa_exact_match,
               "this is plain exact match (1.0 if any human gave the answer): VQA accuracy gives partial credit, "
               "min(#humans who agree / 3, 1), averaged over the 10 ways of leaving one human out"),
        Mutant("min_over_all", vqa_min_over_all,
               "min(#agree / 3, 1) over all answers at once - average it over the leave-one-out subsets "
               "(1 human agrees -> 0.3, not 0.33; 3 agree -> 0.9, not 1.0); with one gold answer, exact match"),
        Mutant("single_answer_zero", vqa_single_answer_zero,
               "with a single gold answer, leave-one-out leaves nobody and scores 0: use exact match there"),
        Mutant("not_normalised", vqa_not_normalised,
               "answers were compared without normalize_answer - normalise the prediction and every gold answer"),
        Mutant("gold_not_normalised", vqa_gold_not_normalised,
               "the gold answers were not normalised: 'Two' or 'Yes.' written by a human must match the prediction "
               "'2' or 'yes' - pass every gold answer through normalize_answer too, not only the prediction"),
        Mutant("prediction_not_normalised", vqa_prediction_not_normalised,
               "the prediction was not normalised: 'Yes' or 'Two' from the model must match 'yes' or '2' - pass the "
               "prediction through normalize_answer too, not only the gold answers"),
    ],
))

# ----------------------------------------------------------------------------------------------
# mmstar_match(prediction, letter) -> float: lmms-eval's MMStar exact_match


def mmstar_match(prediction: str, letter: str) -> float:
    return ev.mmstar_match(prediction, letter)


def mmstar_anywhere(prediction, letter):
    return float(letter.strip().lower() in prediction.lower())


def mmstar_first_standalone_letter(prediction, letter):
    found = re.search(r"\b([A-D])\b", prediction.upper())
    return float(found is not None and found.group(1) == letter.strip().upper())


def mmstar_case_sensitive(prediction, letter):
    p, g = prediction.strip(), letter.strip()
    candidates = [p[len(x)] for x in ("(", "Option ", "The answer is ") if p.startswith(x) and len(p) > len(x)]
    return float(g in candidates + ([p[0]] if p else []))


def mmstar_first_char_only(prediction, letter):
    p = prediction.lower().strip()
    return float(bool(p) and p[0] == letter.strip().lower())


def mmstar_gold_not_lowered(prediction, letter):
    p = prediction.lower().strip().replace("\n", " ")
    candidates = [p[len(x)] for x in ev._LETTER_PREFIXES if p.startswith(x) and len(p) > len(x)]
    return float(letter.strip() in candidates + ([p[0]] if p else []))


def mmstar_returns_bool(prediction, letter):
    return ev.mmstar_match(prediction, letter) == 1.0


def mmstar_no_strip(prediction, letter):
    p, g = prediction.lower().replace("\n", " "), letter.lower()
    candidates = [p[len(x)] for x in ev._LETTER_PREFIXES if p.startswith(x) and len(p) > len(x)]
    return float(g in candidates + ([p[0]] if p else []))


register(Exercise(
    name="mmstar_match", lesson=LESSON, reference=mmstar_match,
    description="lmms-eval's MMStar rule: the gold letter first, or after '(', 'option ' or 'the answer is '",
    cases=[
        Case("'B' for B", lambda: ("B", "B")),
        Case("'b' for B (case-insensitive)", lambda: ("b", "B")),
        Case("'B. a cat' for B", lambda: ("B. a cat", "B")),
        Case("'(b)' for B", lambda: ("(b)", "B")),
        Case("'Option B' for B", lambda: ("Option B", "B")),
        Case("'The answer is B.' for B", lambda: ("The answer is B.", "B")),
        Case("'  B\\n' for B (surrounding whitespace)", lambda: ("  B\n", "B")),
        Case("'C' for gold 'c'", lambda: ("C", "c")),
        Case("'Answer: B' for A (!)", lambda: ("Answer: B", "A")),
        Case("'cat' for C (!)", lambda: ("cat", "C")),
        Case("'I think B' for B (not at a recognised place)", lambda: ("I think B", "B")),
        Case("'Answer: B' for B", lambda: ("Answer: B", "B")),
        Case("'The answer is (B)' for B (!)", lambda: ("The answer is (B)", "B")),
        Case("'**B**' for B", lambda: ("**B**", "B")),
        Case("'' (empty answer) for A", lambda: ("", "A")),
    ],
    mutants=[
        Mutant("anywhere", mmstar_anywhere,
               "the letter was searched anywhere in the text - lmms-eval only looks at the first character, or "
               "right after '(', 'option ' or 'the answer is ' at the start"),
        Mutant("first_standalone_letter", mmstar_first_standalone_letter,
               "a smarter parser (first standalone capital letter) - MMStar's published numbers use lmms-eval's "
               "literal rule: first character, or after '(', 'option ', 'the answer is '"),
        Mutant("first_char_only", mmstar_first_char_only,
               "only the first character was compared - also accept the letter right after '(', 'option ' or "
               "'the answer is ' at the start"),
        Mutant("case_sensitive", mmstar_case_sensitive,
               "the comparison is case-sensitive - lower-case both the prediction and the gold letter first"),
        Mutant("no_strip", mmstar_no_strip, "strip the prediction's surrounding whitespace before looking at it"),
        Mutant("gold_not_lowered", mmstar_gold_not_lowered,
               "the prediction was lower-cased but the gold letter not - lower-case both before comparing"),
        Mutant("returns_bool", mmstar_returns_bool,
               "return a float, 1.0 or 0.0, not a bool: scores are averaged over a dataset"),
    ],
))

# ----------------------------------------------------------------------------------------------
# levenshtein(a, b) -> int


def levenshtein(a: str, b: str) -> int:
    return ev.levenshtein(a, b)


def levenshtein_hamming(a, b):
    return sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))


def _edit_distance(a, b, substitution: int, transposition: bool = False) -> int:
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]) * substitution)
            if transposition and i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[-1][-1]


def levenshtein_indel_only(a, b):
    return _edit_distance(a, b, substitution=2)


def levenshtein_damerau(a, b):
    return _edit_distance(a, b, substitution=1, transposition=True)


def levenshtein_zero_borders(a, b):
    """The table's first row and column left at 0: a prefix turns into '' for free."""
    d = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return d[-1][-1]


def levenshtein_length_difference(a, b):
    return abs(len(a) - len(b))


def levenshtein_case_insensitive(a, b):
    return ev.levenshtein(a.lower(), b.lower())


register(Exercise(
    name="levenshtein", lesson=LESSON, reference=levenshtein,
    description="edit distance: fewest insertions, deletions and substitutions",
    cases=[
        Case("'kitten' -> 'sitting'", lambda: ("kitten", "sitting")),
        Case("'flaw' -> 'lawn'", lambda: ("flaw", "lawn")),
        Case("'' -> 'abc'", lambda: ("", "abc")),
        Case("'abc' -> ''", lambda: ("abc", "")),
        Case("'same' -> 'same'", lambda: ("same", "same")),
        Case("'ab' -> 'ba' (a swap is two edits)", lambda: ("ab", "ba")),
        Case("'intention' -> 'execution'", lambda: ("intention", "execution")),
        Case("'Paris' -> 'paris' (case counts)", lambda: ("Paris", "paris")),
    ],
    mutants=[
        Mutant("hamming", levenshtein_hamming,
               "this compares position by position (plus the length difference) - an insertion shifts every later "
               "character; use dynamic programming over prefixes"),
        Mutant("indel_only", levenshtein_indel_only,
               "a substitution was counted as a deletion plus an insertion (cost 2) - it costs 1"),
        Mutant("damerau", levenshtein_damerau,
               "swapping two neighbours was counted as one edit (Damerau) - Levenshtein has no transposition: 2 edits"),
        Mutant("case_insensitive", levenshtein_case_insensitive,
               "levenshtein itself is case-sensitive - lower-casing is anls's job, not the distance's"),
        Mutant("zero_borders", levenshtein_zero_borders,
               "the table's first row and column start at 0 - they are 0, 1, 2, ...: turning a prefix of i "
               "characters into '' takes i deletions"),
        Mutant("length_difference", levenshtein_length_difference,
               "the length difference is only a lower bound: characters that differ cost an edit too - use dynamic "
               "programming over prefixes"),
    ],
))

# ----------------------------------------------------------------------------------------------
# anls(prediction, answers, threshold=0.5) -> float: DocVQA's score for one question


def anls(prediction: str, answers, threshold: float = 0.5) -> float:
    return ev.anls(prediction, answers, threshold)


def _clean(text):
    return " ".join(text.strip().lower().split())


def _distances(prediction, answers, length=lambda gold, pred: max(len(gold), len(pred)), lower=True):
    answers = [answers] if isinstance(answers, str) else list(answers)
    clean = _clean if lower else (lambda t: " ".join(t.split()))
    out = []
    for gold in answers:
        n = length(gold, prediction)
        out.append(0.0 if n == 0 else ev.levenshtein(clean(gold), clean(prediction)) / n)
    return out


def anls_no_threshold(prediction, answers, threshold=0.5):
    return 1 - min(_distances(prediction, answers))


def anls_threshold_on_distance(prediction, answers, threshold=0.5):
    distance = min(_distances(prediction, answers))
    return 0.0 if distance < threshold else 1 - distance


def anls_boundary_excluded(prediction, answers, threshold=0.5):
    similarity = 1 - min(_distances(prediction, answers))
    return similarity if similarity > threshold else 0.0


def anls_gold_length(prediction, answers, threshold=0.5):
    similarity = 1 - min(_distances(prediction, answers, length=lambda gold, pred: len(gold)))
    return similarity if similarity >= threshold else 0.0


def anls_prediction_length(prediction, answers, threshold=0.5):
    similarity = 1 - min(_distances(prediction, answers, length=lambda gold, pred: len(pred)))
    return similarity if similarity >= threshold else 0.0


def anls_not_normalised(prediction, answers, threshold=0.5):
    similarity = 1 - min(_distances(prediction, answers, length=lambda gold, pred: 1))
    return similarity if similarity >= threshold else 0.0


def anls_first_answer(prediction, answers, threshold=0.5):
    first = answers if isinstance(answers, str) else answers[0]
    return ev.anls(prediction, [first], threshold)


def anls_mean_over_answers(prediction, answers, threshold=0.5):
    similarity = 1 - sum(d := _distances(prediction, answers)) / len(d)
    return similarity if similarity >= threshold else 0.0


def anls_percentage(prediction, answers, threshold=0.5):
    return 100 * ev.anls(prediction, answers, threshold)


def anls_case_sensitive(prediction, answers, threshold=0.5):
    similarity = 1 - min(_distances(prediction, answers, lower=False))
    return similarity if similarity >= threshold else 0.0


register(Exercise(
    name="anls", lesson=LESSON, reference=anls,
    description="1 - normalised edit distance to the closest gold answer, 0 below the threshold",
    cases=[
        Case("'Paris' vs ['paris'] (case)", lambda: ("Paris", ["paris"])),
        Case("'pari' vs ['paris'] (one deletion)", lambda: ("pari", ["paris"])),
        Case("'totals' vs ['total'] (prediction longer)", lambda: ("totals", ["total"])),
        Case("'new yorc' vs ['New York', 'NYC'] (closest gold)", lambda: ("new yorc", ["New York", "NYC"])),
        Case("'nyc' vs ['New York', 'NYC'] (the second gold answer)", lambda: ("nyc", ["New York", "NYC"])),
        Case("'abcd' vs ['abxy']: distance exactly 0.5", lambda: ("abcd", ["abxy"])),
        Case("'May 12' vs ['12 May'] (more than half wrong)", lambda: ("May 12", ["12 May"])),
        Case("'london' vs ['paris']", lambda: ("london", ["paris"])),
        Case("'Paris' vs 'PARIS' (one gold answer as a string)", lambda: ("Paris", "PARIS")),
        Case("'pari' vs ['paris'] with threshold 0.9", lambda: ("pari", ["paris"], 0.9)),
    ],
    mutants=[
        Mutant("no_threshold", anls_no_threshold,
               "no threshold: a similarity below `threshold` (more than half the characters wrong) must score 0"),
        Mutant("boundary_excluded", anls_boundary_excluded,
               "a similarity exactly equal to the threshold is kept by the official script (0 only when "
               "similarity < threshold)"),
        Mutant("not_normalised", anls_not_normalised,
               "the edit distance was not normalised - divide it by the length of the longer string"),
        Mutant("first_answer_only", anls_first_answer,
               "only the first gold answer was compared - take the closest of all gold answers (smallest distance)"),
        Mutant("threshold_on_distance", anls_threshold_on_distance,
               "the threshold was applied to the distance: it is the *similarity* 1 - d that must reach the "
               "threshold, otherwise the score is 0"),
        Mutant("gold_length", anls_gold_length,
               "the distance was divided by the gold answer's length - divide by the longer of the two strings"),
        Mutant("prediction_length", anls_prediction_length,
               "the distance was divided by the prediction's length - divide by the longer of the two strings"),
        Mutant("mean_over_answers", anls_mean_over_answers,
               "the similarity was averaged over the gold answers - take the best one (the smallest distance): any "
               "one correct reading is enough"),
        Mutant("case_sensitive", anls_case_sensitive,
               "lower-case (and strip) both strings before the edit distance"),
        Mutant("percentage", anls_percentage,
               "that is a percentage: return the score in [0, 1] (papers multiply the dataset's mean by 100 to print it)"),
    ],
))
