"""Metrics checked on hand-worked cases of the reference scorers (VQAv2 vqaEval.py, lmms-eval MMStar,
DocVQA ANLS), including their quirks; MMStar loading checked on a tiny local fixture."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import pytest
from PIL import Image

from vlm_course import evaluation
from vlm_course.evaluation import (
    anls,
    box_accuracy,
    box_iou,
    extract_choice_letter,
    levenshtein,
    load_mmstar,
    mmstar_category_scores,
    mmstar_macro_average,
    mmstar_match,
    normalize_answer,
    parse_box,
    vqa_accuracy,
)

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "mmstar"
FIXTURE = FIXTURE_DIR / "val.parquet"


# --- VQA normalisation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("raw, expected", [
    ("Two dogs.", "2 dogs"),           # number word -> digit, final period dropped
    ("1,000", "1000"),                 # comma between digits removed
    ("3.14", "3.14"),                  # a period followed by a digit stays
    (".5", ".5"),
    ("3.", "3"),
    ("e.g.", "eg"),
    ("isnt", "isn't"),                 # contractions restored
    ("Dont", "don't"),
    ("the red ball", "red ball"),      # articles dropped
    ("A cat and an owl", "cat and owl"),
    ("yes!", "yes"),                   # "!" inside a word becomes a space, then whitespace collapses
    ("Yes, it is", "yes it is"),       # "," next to a space is deleted
    ("a,b", "b"),                      # "," inside a word becomes a space; then "a" is an article
    ("x-ray", "x ray"),
    ("1,000 dogs!", "1000 dogs"),      # a number comma makes every mark be deleted, not spaced
    ("none", "0"),
    ("ten", "10"),
    ("eleven", "eleven"),              # the official map stops at ten
    (" \n Yes\t", "yes"),              # newlines, tabs and outer whitespace
    ("Dogs: 2", "dogs: 2"),            # ":" is not in the official punctuation list
    ("it's", "it's"),                  # apostrophes survive
    ("Im", "im"),                      # the table's "Im" key has a capital, so it never matches
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_answer_keeps_the_official_32_period_limit():
    # vqaEval passes re.UNICODE (= 32) as `count` to periodStrip.sub: only 32 periods are removed.
    assert normalize_answer("." * 40) == "." * 8
    assert normalize_answer("." * 32) == ""


def test_normalize_answer_rejects_non_strings():
    with pytest.raises(TypeError, match="expects a string"):
        normalize_answer(None)


# --- VQA accuracy ----------------------------------------------------------------------------------------

def _ten(prediction_votes: int, answer: str = "2", other: str = "3") -> list[str]:
    return [answer] * prediction_votes + [other] * (10 - prediction_votes)


@pytest.mark.parametrize("votes, expected", [
    (0, 0.0),
    # 1 match: the 1 subset without that annotator has 0 matches, the 9 others have 1 -> 1/3 each:
    # (1*0 + 9*1/3) / 10 = 0.3
    (1, 0.3),
    # 2 matches: 8 subsets contain both -> 2/3 each, 2 subsets contain one -> 1/3 each:
    # (8*2/3 + 2*1/3) / 10 = 0.6
    (2, 0.6),
    # 3 matches: 7 subsets contain all three -> 1, 3 subsets contain two -> 2/3: (7 + 3*2/3) / 10 = 0.9
    (3, 0.9),
    # 4 matches: every subset keeps at least 3 -> 1
    (4, 1.0),
    (10, 1.0),
])
def test_vqa_accuracy_ten_answers(votes, expected):
    assert vqa_accuracy("two", _ten(votes)) == pytest.approx(expected)


def test_vqa_accuracy_normalises_both_sides():
    answers = ["2", "2", "2", "Two.", "two", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", answers) == pytest.approx(1.0)
    assert vqa_accuracy("The red ball.", ["red ball"]) == 1.0


def test_vqa_accuracy_single_answer_is_exact_match():
    assert vqa_accuracy("yes!", ["Yes"]) == 1.0
    assert vqa_accuracy("yes", "yes") == 1.0  # a plain string is one answer
    assert vqa_accuracy("no", ["yes"]) == 0.0
    assert vqa_accuracy("red ball", ["red balls"]) == 0.0


def test_vqa_accuracy_other_lengths_use_leave_one_out():
    # 5 answers, 3 match: 3 subsets drop a match -> 2/3, 2 subsets keep all 3 -> 1: (3*2/3 + 2) / 5 = 0.8
    assert vqa_accuracy("cat", ["cat", "cat", "cat", "dog", "dog"]) == pytest.approx(0.8)
    # 2 answers, both match: each subset holds 1 match -> 1/3
    assert vqa_accuracy("cat", ["cat", "cat"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_rejects_empty_answers():
    with pytest.raises(ValueError, match="empty"):
        vqa_accuracy("cat", [])
    with pytest.raises(TypeError, match="must be strings"):
        vqa_accuracy("cat", [1, 2])


# --- MMStar -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prediction, letter, expected", [
    ("A", "A", 1.0),
    ("a", "A", 1.0),                   # lower-cased
    ("A", "a", 1.0),
    ("  \nD\n", "D", 1.0),             # stripped
    ("(B) cat", "B", 1.0),
    ("(b)", "B", 1.0),
    ("The answer is C.", "C", 1.0),
    ("option D", "D", 1.0),
    ("Option D: dog", "D", 1.0),
    ("B. cat", "B", 1.0),
    ("B", "A", 0.0),
    ("Answer: B", "B", 0.0),           # no rule reads a letter after "answer:" ...
    ("Answer: B", "A", 1.0),           # ... but the first-character rule reads "a"
    ("I think B", "B", 0.0),
    ("The answer is (A)", "A", 0.0),   # the character after "the answer is " is "("
    ("the answer is", "A", 0.0),       # stripped, so the prefix "the answer is " is not there
    ("", "A", 0.0),                    # nothing at all
    ("(", "A", 0.0),
    ("cat", "C", 1.0),                 # quirk: the first-character rule reads "c"
    ("an apple", "A", 1.0),            # quirk: ... and "a"
    ("the cat", "T", 1.0),
])
def test_mmstar_match_follows_lmms_eval(prediction, letter, expected):
    assert mmstar_match(prediction, letter) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("B. cat", "B"),
    ("(c)", "C"),
    ("the answer is d", "D"),
    ("option a", "A"),
    ("Answer: B", "A"),                # what lmms-eval reads: the first character
    ("", None),
    ("E", None),
    ("cat", "C"),
    ("yes", None),
])
def test_extract_choice_letter(prediction, expected):
    assert extract_choice_letter(prediction) == expected


def test_extract_choice_letter_other_letter_sets():
    assert extract_choice_letter("E) fish", letters="ABCDE") == "E"
    assert extract_choice_letter("option b", letters="ABCDO") == "B"  # the prefix rule wins over "o"


def test_extract_choice_letter_agrees_with_mmstar_match():
    predictions = ["A", "b", "(C) x", "Option d", "The answer is B.", "cat", "dog", "", "(", "Answer: A",
                   "the answer is (a)", "E", "  a\n", "option", "bird"]
    for prediction in predictions:
        for gold in "ABCD":
            assert mmstar_match(prediction, gold) == float(extract_choice_letter(prediction) == gold), \
                (prediction, gold)


def _records():
    # sub-axis x: 3 of 4 right, y: 0 of 1, z: 1 of 2.  Macro: (0.75 + 0 + 0.5) / 3; micro would be 4/7.
    return ([{"category": "perception", "l2_category": "x", "score": s} for s in (1, 1, 1, 0)]
            + [{"category": "perception", "l2_category": "y", "score": 0.0}]
            + [{"category": "math", "l2_category": "z", "score": s} for s in (1.0, 0.0)])


def test_mmstar_macro_average_weighs_sub_axes_equally():
    assert mmstar_macro_average(_records()) == pytest.approx(1.25 / 3)
    assert mmstar_macro_average(iter(_records())) == pytest.approx(1.25 / 3)  # any iterable


def test_mmstar_category_scores():
    table = mmstar_category_scores(_records())
    assert table == pytest.approx({"perception": (0.75 + 0.0) / 2, "math": 0.5, "average": 1.25 / 3})


def test_mmstar_aggregation_errors_say_what_is_missing():
    with pytest.raises(ValueError, match="No MMStar records"):
        mmstar_macro_average([])
    with pytest.raises(KeyError, match="l2_category"):
        mmstar_macro_average([{"score": 1.0}])
    with pytest.raises(KeyError, match="category"):
        mmstar_category_scores([{"l2_category": "x", "score": 1.0}])


# --- ANLS -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("a, b, distance", [
    ("kitten", "sitting", 3),
    ("flaw", "lawn", 2),
    ("", "abc", 3),
    ("abc", "", 3),
    ("abc", "abc", 0),
    ("abc", "acb", 2),
])
def test_levenshtein(a, b, distance):
    assert levenshtein(a, b) == distance
    assert levenshtein(b, a) == distance


def test_anls_hand_worked():
    assert anls("Paris", ["paris"]) == 1.0                        # case does not matter
    assert anls("  new   york ", ["New York"]) == 1.0             # nor extra whitespace
    assert anls("abcdefghix", ["abcdefghij"]) == pytest.approx(0.9)  # 1 edit / 10 characters
    assert anls("abcdxyzwvu", ["abcdefghij"]) == 0.0              # 6 of 10 wrong: 0.4 < 0.5 -> 0
    assert anls("abcdefghix", ["zzz", "abcdefghij"]) == pytest.approx(0.9)  # closest gold answer counts
    assert anls("abcdefghix", "abcdefghij") == pytest.approx(0.9)  # a plain string is one answer


def test_anls_threshold_and_official_details():
    # exactly half wrong: the official script keeps a score equal to the threshold
    assert anls("ax", ["ab"]) == pytest.approx(0.5)
    assert anls("ax", ["ab"], threshold=0.6) == 0.0
    # the official script divides by the raw lengths: dist("pari", "paris") = 1 over len("  Pari  ") = 8
    assert anls("  Pari  ", ["Paris"]) == pytest.approx(1 - 1 / 8)
    assert anls("", [""]) == 1.0


def test_anls_rejects_empty_answers():
    with pytest.raises(ValueError, match="empty"):
        anls("x", [])


# --- boxes -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("[100, 200, 300, 400]", (100.0, 200.0, 300.0, 400.0)),
    ("(100,200),(300,400)", (100.0, 200.0, 300.0, 400.0)),
    ("(100, 200), (300, 400)", (100.0, 200.0, 300.0, 400.0)),
    ("The cat is at [10.5, 20, 30, 40.25].", (10.5, 20.0, 30.0, 40.25)),
    ("first (1,2),(3,4) then [5, 6, 7, 8]", (1.0, 2.0, 3.0, 4.0)),  # the first box in the text
    ("[0, 0, 1000, 1000]", (0.0, 0.0, 1000.0, 1000.0)),
    ("no box here", None),
    ("[1, 2, 3]", None),
    ("[300, 200, 100, 400]", None),    # x2 < x1
    ("[0, 0, 1001, 5]", None),         # outside 0-1000
    ("[-5, 0, 10, 10]", None),
])
def test_parse_box(text, expected):
    assert parse_box(text) == expected


@pytest.mark.parametrize("a, b, expected", [
    ((0, 0, 100, 100), (0, 0, 100, 100), 1.0),
    ((0, 0, 100, 100), (200, 200, 300, 300), 0.0),
    ((0, 0, 100, 100), (100, 0, 200, 100), 0.0),          # touching edges
    ((0, 0, 100, 100), (50, 0, 150, 100), 1 / 3),         # 5000 / (10000 + 10000 - 5000)
    ((0, 0, 100, 100), (0, 0, 50, 50), 0.25),             # contained: 2500 / 10000
    ((0, 0, 100, 200), (0, 100, 100, 300), 1 / 3),
])
def test_box_iou(a, b, expected):
    assert box_iou(a, b) == pytest.approx(expected)
    assert box_iou(b, a) == pytest.approx(expected)


def test_box_accuracy():
    gold = "[0, 0, 100, 100]"
    assert box_accuracy("It is at [0, 0, 100, 100]", gold) == 1.0
    assert box_accuracy("(0,0),(50,100)", gold) == 1.0                # IoU 0.5 counts (>=)
    assert box_accuracy("(0,0),(50,100)", gold, iou_threshold=0.6) == 0.0
    assert box_accuracy("[50, 0, 150, 100]", gold) == 0.0             # IoU 1/3
    assert box_accuracy("somewhere on the left", gold) == 0.0
    assert box_accuracy("[0, 0, 100, 100]", (0, 0, 100, 100)) == 1.0  # gold as numbers
    with pytest.raises(ValueError, match=r"\[x1, y1, x2, y2\]"):
        box_accuracy("[0, 0, 1, 1]", "the left half")


# --- MMStar loading ----------------------------------------------------------------------------------------

def test_fixture_is_small_and_reproducible():
    assert FIXTURE.stat().st_size < 50_000
    sys.path.insert(0, str(FIXTURE_DIR))
    try:
        import make_fixture
    finally:
        sys.path.remove(str(FIXTURE_DIR))
    rows = load_mmstar(FIXTURE)
    expected = make_fixture.fixture_rows()
    assert [r["answer"] for r in rows] == [e["answer"] for e in expected]
    for row, spec in zip(rows, expected):
        assert row["image"].tobytes() == Image.open(io.BytesIO(spec["image"]["bytes"])).tobytes()


def test_load_mmstar_from_local_parquet():
    rows = load_mmstar(FIXTURE)
    assert len(rows) == 6
    row = rows[2]
    assert set(row) == {"index", "question", "image", "answer", "category", "l2_category", "meta_info"}
    assert row["index"] == 2 and row["answer"] == "C"
    assert row["l2_category"] == "image style & quality" and row["category"] == "coarse perception"
    assert "\nOptions: A: red, B: green, C: blue, D: yellow" in row["question"]
    assert row["meta_info"] == {"source": "vlm_course fixture", "split": "val", "image_path": "2.png"}
    assert isinstance(row["image"], Image.Image) and row["image"].mode == "RGB"
    assert row["image"].size == (24, 8)
    assert row["image"].getpixel((0, 0)) == (30, 60, 220)  # blue: the answer C matches the picture


def test_load_mmstar_limit_and_folder():
    assert [r["index"] for r in load_mmstar(FIXTURE_DIR, limit=2)] == [0, 1]
    assert load_mmstar(str(FIXTURE), limit=0) == []
    assert len(load_mmstar(FIXTURE, limit=100)) == 6
    with pytest.raises(ValueError, match="limit"):
        load_mmstar(FIXTURE, limit=-1)


def test_fixture_reads_with_datasets_like_the_hub(tmp_path):
    import datasets

    dataset = datasets.load_dataset("parquet", data_files=str(FIXTURE), split="train", cache_dir=str(tmp_path))
    assert isinstance(dataset.features["image"], datasets.Image)
    assert isinstance(dataset[0]["image"], Image.Image)


def test_load_mmstar_hub_branch_without_network(monkeypatch, tmp_path):
    # The hub path with datasets.load_dataset replaced by a local read: checks row conversion and limit.
    import datasets

    local = datasets.load_dataset("parquet", data_files=str(FIXTURE), split="train", cache_dir=str(tmp_path))
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return local

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    rows = load_mmstar("Lin-Chen/MMStar", split="val", limit=3)
    assert calls == [("Lin-Chen/MMStar", "val")]
    assert [r["answer"] for r in rows] == ["A", "B", "C"]
    assert rows[0]["image"].mode == "RGB"


def test_load_mmstar_wraps_hub_failures(monkeypatch):
    import datasets

    def failing_load_dataset(name, split):
        raise ConnectionError("no route to host")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", failing_load_dataset)
    with pytest.raises(RuntimeError, match="no route to host") as error:
        load_mmstar("Lin-Chen/MMStar")
    assert "to_parquet" in str(error.value)  # says how to get a local copy


def test_load_mmstar_offline_errors_say_what_to_do(monkeypatch, tmp_path):
    import datasets

    def must_not_be_called(*args, **kwargs):
        raise AssertionError("the hub must not be contacted when it is switched off")

    monkeypatch.setattr(datasets, "load_dataset", must_not_be_called)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE") as error:
        load_mmstar("Lin-Chen/MMStar")
    assert "load_mmstar('mmstar_val.parquet')" in str(error.value)

    with pytest.raises(FileNotFoundError, match="No MMStar file") as error:
        load_mmstar(tmp_path / "missing" / "mmstar_val.parquet")
    assert "to_parquet" in str(error.value)
    with pytest.raises(FileNotFoundError, match="no .parquet or .jsonl"):
        load_mmstar(tmp_path)  # an existing folder with no data


def _jsonl_row(index, image, answer="A"):
    return {"index": index, "question": "Q?\nOptions: A: x, B: y", "image": image, "answer": answer,
            "category": "math", "l2_category": "geometry"}


def test_load_mmstar_from_jsonl(tmp_path):
    png = io.BytesIO()
    Image.new("L", (5, 3), 128).save(png, format="PNG")
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes(png.getvalue())
    rows = [_jsonl_row(0, "images/0.png"), _jsonl_row(1, base64.b64encode(png.getvalue()).decode(), "B")]
    path = tmp_path / "val.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    loaded = load_mmstar(path)
    assert [r["answer"] for r in loaded] == ["A", "B"]
    for row in loaded:
        assert row["image"].mode == "RGB" and row["image"].size == (5, 3)
        assert row["image"].getpixel((0, 0)) == (128, 128, 128)
        assert row["meta_info"] is None


def test_load_mmstar_bad_rows_get_clear_errors(tmp_path):
    path = tmp_path / "val.jsonl"
    path.write_text(json.dumps({"index": 0, "question": "Q?", "answer": "A"}) + "\n")
    with pytest.raises(ValueError, match=r"lacks the fields \['image', 'category', 'l2_category'\]"):
        load_mmstar(path)

    path.write_text(json.dumps(_jsonl_row(7, "bm90IGFuIGltYWdl")) + "\n")  # valid base64, not an image
    with pytest.raises(ValueError, match="index 7: its image cannot be decoded"):
        load_mmstar(path)


def test_metrics_do_not_import_torch():
    from vlm_course.evaluation import boxes, docvqa, mmstar, scoring, vqa

    assert "torch" not in evaluation.__dict__
    for module in (vqa, mmstar, docvqa, boxes, scoring):
        assert "import torch" not in Path(module.__file__).read_text(), module.__name__
