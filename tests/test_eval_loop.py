"""The eval loops: scoring dispatch, batched evaluation, tables, JSON, gallery, image gain and the CLI.

Most tests drive `evaluate` with a scripted stand-in for the model: it has VisionLanguageModel's `generate`
signature, goes through the real processor and `vlm.answer`, and answers with a rule we choose, so every
expected score is known in advance. The CLI tests run the real tiny model end to end.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from vlm_course.config import get_profile
from vlm_course.evaluation import (
    EvalResult,
    ImageGain,
    blank_fill,
    blank_like,
    compare_before_after,
    error_gallery,
    eval_main,
    evaluate,
    exact_answer_match,
    image_gain,
    load_mmstar,
    metric_for,
    mmstar_prompt,
    score_answer,
)
from vlm_course.processing import VLMProcessor

MMSTAR_FIXTURE = Path(__file__).parent / "fixtures" / "mmstar" / "val.parquet"
PALETTE = {"red": (215, 35, 35), "green": (35, 155, 55), "blue": (35, 85, 225)}
GREY = (128, 128, 128)


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(get_profile("tiny").config)


class ScriptedModel(torch.nn.Module):
    """Stands in for VisionLanguageModel: answers `reply(prompt, pixels)` per row and records what it saw."""

    def __init__(self, processor, reply):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # vlm.answer reads the device from a parameter
        self.processor, self.reply = processor, reply
        self.seen_pixels: list[torch.Tensor] = []
        self.seen_prompts: list[str] = []
        self.training_during_generate: list[bool] = []

    def generate(self, input_ids, pixel_values=None, attention_mask=None, max_new_tokens=32, eos_token_id=None,
                 pad_token_id=None, **kwargs):
        self.seen_pixels.append(pixel_values.clone())
        self.training_during_generate.append(self.training)
        prompts = [self.processor.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask)]
        self.seen_prompts += prompts
        # One image per row in these tests, so pixel_values[i] belongs to row i.
        replies = [self.reply(prompt, pixels) for prompt, pixels in zip(prompts, pixel_values)]
        rows = [self.processor.text_ids(text)[: max_new_tokens - 1] + [eos_token_id] for text in replies]
        width = max(len(row) for row in rows)
        return torch.tensor([row + [pad_token_id] * (width - len(row)) for row in rows])


def always(text):
    return lambda prompt, pixels: text


def mean_rgb(pixels: torch.Tensor, processor) -> tuple[float, ...]:
    """Undo the processor's normalisation and average each channel, in 0-255."""
    vision = processor.config.vision
    mean, std = torch.tensor(vision.image_mean).view(3, 1, 1), torch.tensor(vision.image_std).view(3, 1, 1)
    return tuple(((pixels * std + mean) * 255).mean(dim=(1, 2)).tolist())


def colour_reader(processor):
    """A 'model' that really looks: it names the palette colour (or grey) nearest to the image's mean colour."""
    named = {**PALETTE, "grey": GREY}

    def reply(prompt, pixels):
        rgb = mean_rgb(pixels, processor)
        return min(named, key=lambda name: sum((a - b) ** 2 for a, b in zip(rgb, named[name])))
    return reply


def colour_row(colour: str, subset: str = "shapes", answer: str | None = None, size=(64, 64)) -> dict:
    return {"images": [Image.new("RGB", size, PALETTE[colour])],
            "texts": [{"user": "What colour is the image?", "assistant": answer or colour,
                       "source": f"synthetic-{subset}"}],
            "source": subset}


def text_row(question: str, answer: str, subset: str, colour: str = "red") -> dict:
    row = colour_row(colour, subset)
    row["texts"][0].update(user=question, assistant=answer)
    return row


GOLD_COLOURS = ["red", "blue", "red", "green", "red", "blue", "green", "blue"]  # 3 of 8 are red


def run(processor, reply, rows, **options):
    model = ScriptedModel(processor, reply)
    options.setdefault("progress", False)
    return model, evaluate(model, processor, rows, **options)


# --- scoring dispatch ------------------------------------------------------------------------------------

@pytest.mark.parametrize("subset, prediction, answers, expected", [
    ("mc", "B. cat", "B", 1.0),                             # MMStar's first-character rule
    ("mc", "Answer: B", "B", 0.0),                          # ... which reads "a" here
    ("mmstar", "(c)", ["C"], 1.0),
    ("grounding", "at [100, 100, 300, 300]", "[110, 100, 300, 300]", 1.0),  # IoU 0.95
    ("grounding", "[0, 0, 100, 100]", "[110, 100, 300, 300]", 0.0),         # no overlap
    ("grounding", "[0, 0, 100, 100]", ["[500, 500, 600, 600]", "[0, 0, 100, 90]"], 1.0),  # best gold box
    ("box", "[0, 0, 100, 100]", "[0, 0, 100, 100]", 1.0),                   # a metric name works too
    ("ocr", "ocaan", "ocean", pytest.approx(0.8)),          # ANLS: one edit in five letters
    ("doc", "Ocean", ["sea", "ocean"], 1.0),
    ("anls", "xyz", "ocean", 0.0),                          # below the 0.5 threshold
    ("shapes", "Two.", "2", 1.0),                           # VQA normalisation
    ("count", "3", "2", 0.0),
    ("vqa", "yes", ["yes"] * 3 + ["no"] * 7, pytest.approx(0.9)),  # official leave-one-out
])
def test_score_answer_dispatches_by_subset(subset, prediction, answers, expected):
    assert score_answer(subset, prediction, answers) == expected


def test_metric_for():
    assert [metric_for(name) for name in ("mc", "mmstar", "grounding", "ocr", "doc", "spatial", "anls")] == [
        "mc", "mc", "box", "anls", "anls", "vqa", "anls"]


def test_score_answer_refuses_a_gold_answer_that_is_not_a_letter():
    with pytest.raises(ValueError, match="option letter"):
        score_answer("mc", "B", "cat")


@pytest.mark.parametrize("subset, prediction, answers, expected", [
    ("mc", "B", "B", 1.0),
    ("mc", "b", "B", 1.0),
    ("mc", "B. cat", "B", 0.0),    # right for MMStar, but not the bare letter
    ("mc", "", "A", 0.0),          # "A" normalises to "" (an article): must not match an empty answer
    ("shapes", "", "a", 0.0),
    ("ocr", "Ocean.", "ocean", 1.0),
    ("ocr", "ocaan", "ocean", 0.0),
])
def test_exact_answer_match(subset, prediction, answers, expected):
    assert exact_answer_match(subset, prediction, answers) == expected


# --- evaluate -----------------------------------------------------------------------------------------------

def test_a_model_that_always_says_red_scores_the_fraction_of_red_answers(processor):
    rows = [colour_row(colour) for colour in GOLD_COLOURS]
    model, result = run(processor, always("red"), rows, batch_size=3)
    assert result.by_subset == {"shapes": pytest.approx(3 / 8)}
    assert result.overall == pytest.approx(3 / 8)
    assert [record.prediction for record in result.records] == ["red"] * 8
    assert [record.score for record in result.records] == [float(c == "red") for c in GOLD_COLOURS]
    assert [len(pixels) for pixels in model.seen_pixels] == [3, 3, 2]  # batched, last batch short


def test_evaluate_uses_eval_mode_and_gives_the_model_back_as_it_was(processor):
    model = ScriptedModel(processor, always("red")).train()
    evaluate(model, processor, [colour_row("red")] * 3, batch_size=2, progress=False)
    assert model.training_during_generate == [False, False]
    assert model.training


def test_scores_per_subset_and_the_overall_mean_of_subsets(processor):
    def reply(prompt, pixels):
        if "Options" in prompt:
            return "A"
        if "box" in prompt:
            return "[0, 0, 500, 500]"
        if "word" in prompt:
            return "ocaan"
        return "red"

    rows = ([colour_row(c) for c in ("red", "blue", "green", "blue")]
            + [text_row("Pick one.\nOptions:\nA. x\nB. y", "A", "mc")] * 2
            + [text_row("What word is written?", "ocean", "ocr")]
            + [text_row("Where is it? Answer with a box.", box, "grounding")
               for box in ("[0, 0, 500, 500]", "[500, 500, 1000, 1000]", "[600, 0, 1000, 400]")])
    _, result = run(processor, reply, rows, batch_size=4)

    expected = {"shapes": 0.25, "mc": 1.0, "ocr": 0.8, "grounding": 1 / 3}
    assert result.by_subset == pytest.approx(expected)
    # Every subset weighs the same: the mean of the four scores, not the fraction of the 10 questions.
    assert result.overall == pytest.approx(sum(expected.values()) / 4)
    assert result.overall != pytest.approx(sum(r.score for r in result.records) / 10)
    table = result.table()
    assert [(row["subset"], row["metric"], row["n"]) for row in table] == [
        ("shapes", "vqa", 4), ("mc", "mc", 2), ("ocr", "anls", 1), ("grounding", "box", 3),
        ("overall", "mean of subsets", 10)]
    assert [row["exact"] for row in table[:4]] == pytest.approx([0.25, 1.0, 0.0, 1 / 3])
    text = result.format_table()
    assert "ocr" in text and "0.800" in text and str(result) == text


def test_only_the_first_turn_of_a_conversation_is_asked(processor):
    row = colour_row("red")
    row["texts"].append({"user": "And what shape is it?", "assistant": "square", "source": "synthetic-shapes"})
    model, result = run(processor, always("red"), [row])
    assert result.records[0].question == "What colour is the image?"
    assert result.records[0].answers == ["red"] and result.records[0].score == 1.0
    assert "What colour is the image?" in model.seen_prompts[0]
    assert "what shape" not in model.seen_prompts[0]


def test_rows_from_the_synthetic_generator_keep_their_subset_names(processor):
    from vlm_course.data.synthetic import generate

    rows = generate("count", 3, seed=5) + generate("spatial", 2, seed=5)  # no row-level "source" here
    _, result = run(processor, always("2"), rows)
    assert result.subsets == ["count", "spatial"]
    assert [r.score for r in result.records] == [float(row["texts"][0]["assistant"] == "2") for row in rows]


def test_evaluate_rejects_empty_or_malformed_input(processor):
    model = ScriptedModel(processor, always("red"))
    with pytest.raises(ValueError, match="no rows"):
        evaluate(model, processor, [], progress=False)
    with pytest.raises(ValueError, match="texts"):
        evaluate(model, processor, [{"images": [Image.new("RGB", (64, 64))], "texts": []}], progress=False)


# --- blank images and the gain from the image ------------------------------------------------------------

def test_blank_like_keeps_the_size_and_fills_one_colour():
    blank = blank_like(Image.new("RGB", (30, 20), "red"), (1, 2, 3))
    assert blank.size == (30, 20) and blank.mode == "RGB"
    assert blank.getcolors() == [(600, (1, 2, 3))]


def test_blank_fill_is_the_normalisation_mean(processor):
    assert blank_fill(processor) == GREY  # SigLIP's mean 0.5 per channel


def test_the_blank_image_path_really_gives_the_model_a_blank_image(processor):
    rows = [colour_row(colour) for colour in GOLD_COLOURS]
    seeing, real = run(processor, colour_reader(processor), rows, batch_size=4)
    blind, blank = run(processor, colour_reader(processor), rows, batch_size=4, blank_image=True)

    real_pixels, blank_pixels = torch.cat(seeing.seen_pixels), torch.cat(blind.seen_pixels)
    assert [mean_rgb(p, processor) for p in real_pixels] == [pytest.approx(PALETTE[c], abs=1) for c in GOLD_COLOURS]
    # Blank: every pixel of every image is the normalised grey, (128/255 - 0.5) / 0.5, close to zero.
    assert torch.allclose(blank_pixels, torch.full_like(blank_pixels, (128 / 255 - 0.5) / 0.5), atol=1e-6)
    assert real.overall == 1.0 and blank.overall == 0.0
    assert {r.prediction for r in blank.records} == {"grey"}
    assert blank.records[0].image.getcolors() == [(blank.records[0].image.size[0] ** 2, GREY)]
    assert real.records[0].image is rows[0]["images"][0]


def test_image_gain_per_subset(processor):
    # The colour reader needs the image for colours; for counts it is wrong with or without the image.
    rows = [colour_row(c) for c in ("red", "green", "blue")] + [colour_row("red", "count", answer="2")] * 2
    gain = image_gain(ScriptedModel(processor, colour_reader(processor)), processor, rows, progress=False)
    assert isinstance(gain, ImageGain)
    assert gain.with_image.by_subset == {"shapes": 1.0, "count": 0.0}
    assert gain.without_image.by_subset == {"shapes": 0.0, "count": 0.0}
    assert gain.by_subset == {"shapes": 1.0, "count": 0.0}
    assert gain.overall == pytest.approx(0.5)
    assert gain.table()[-1] == {"subset": "overall", "n": 5, "with_image": 0.5, "blank_image": 0.0, "gain": 0.5}
    assert "+1.000" in gain.format_table()


# --- gallery, JSON, before/after ------------------------------------------------------------------------

@pytest.fixture()
def red_result(processor):
    return run(processor, always("red"), [colour_row(c) for c in GOLD_COLOURS])[1]  # 3 right, 5 wrong


def test_error_gallery_shows_the_errors_in_red(red_result):
    figure = error_gallery(red_result, n=12)
    assert len(figure.axes) == 5
    assert {ax.title.get_color() for ax in figure.axes} == {"tab:red"}
    assert len(error_gallery(red_result, n=2).axes) == 2
    everything = error_gallery(red_result, n=12, only_errors=False)
    assert len(everything.axes) == 8
    assert [ax.title.get_color() == "tab:green" for ax in everything.axes] == [c == "red" for c in GOLD_COLOURS]
    figure.savefig(io.BytesIO(), format="png")  # it draws


def test_error_gallery_takes_subsets_in_turn_and_says_when_there_is_nothing(processor):
    rows = [colour_row("blue")] * 4 + [colour_row("blue", "count", answer="2")] * 4
    _, result = run(processor, always("red"), rows)
    assert [ax.get_title().split(" ")[0] for ax in error_gallery(result, n=2).axes] == ["shapes", "count"]
    _, perfect = run(processor, always("red"), [colour_row("red")] * 2)
    empty = error_gallery(perfect)
    assert len(empty.axes) == 1 and "No errors" in empty.axes[0].texts[0].get_text()


def test_results_round_trip_through_json(red_result, tmp_path):
    path = red_result.to_json(tmp_path / "out" / "results.json")
    data = json.loads(path.read_text())
    assert data["summary"]["by_subset"] == {"shapes": 0.375}
    assert len(data["records"]) == 8 and "image" not in data["records"][0]
    loaded = EvalResult.from_json(path)
    assert loaded.by_subset == red_result.by_subset
    assert [r.to_dict() for r in loaded.records] == [r.to_dict() for r in red_result.records]
    assert len(error_gallery(loaded).axes) == 5  # drawn without images


def test_compare_before_after(processor, red_result):
    rows = [colour_row(c) for c in GOLD_COLOURS]
    _, after = run(processor, colour_reader(processor), rows)
    lines = compare_before_after(red_result, after).splitlines()
    assert lines[1].split() == ["shapes", "0.375", "1.000", "+0.625"]
    assert lines[2].split() == ["overall", "0.375", "1.000", "+0.625"]
    assert lines[3] == "per question: 5 fixed, 0 broken, 3 unchanged"
    # Different questions: no per-question line; a subset only one run has shows "-".
    _, other = run(processor, always("2"), [colour_row("red", "count", answer="2")])
    text = compare_before_after(red_result, other)
    assert "fixed" not in text
    assert text.splitlines()[1].split() == ["shapes", "0.375", "-", "-"]


# --- MMStar ---------------------------------------------------------------------------------------------------

def test_mmstar_prompt_follows_lmms_eval():
    question = "  Is it red? Please answer yes or no.\nOptions: A: yes, B: no\n"
    assert mmstar_prompt(question) == (
        "Is it red?\nOptions: A: yes, B: no\nAnswer with the option's letter from the given choices directly")


def test_mmstar_rows_are_scored_with_mmstars_macro_average(processor):
    rows = load_mmstar(MMSTAR_FIXTURE)  # answers A B C D B C; sub-axes: scene x2, style, recognition x3
    model, result = run(processor, always("B"), rows)
    assert [r.score for r in result.records] == [0, 1, 0, 0, 1, 0]
    # Sub-axis means 1/2, 0, 1/3 -> 5/18 (not the plain 2/6).
    assert result.by_subset == {"mmstar": pytest.approx(5 / 18)}
    assert result.mmstar_scores() == pytest.approx(
        {"coarse perception": 0.25, "fine-grained perception": 1 / 3, "average": 5 / 18})
    assert model.seen_prompts[0].count("from the given choices directly") == 1


# --- the command line ---------------------------------------------------------------------------------------

def test_eval_main_on_the_tiny_profile_writes_its_files(tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--profile", "tiny", "--subsets", "shapes,mc", "--limit", "2", "--max-new-tokens", "4",
            "--out", str(out), "--no-progress"]
    assert eval_main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["subset"] for r in data["records"]] == ["shapes", "shapes", "mc", "mc"]
    for record in data["records"]:  # the stored scores are the metric applied to the stored predictions
        assert record["score"] == score_answer(record["subset"], record["prediction"], record["answers"])
    assert Image.open(out / "gallery.png").size[0] > 100
    table = (out / "table.txt").read_text()
    printed = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["subset", "metric", "n", "score", "exact"]
    assert table.strip() in printed and "profile tiny" in printed and "overall" in printed.splitlines()[-1]


def test_eval_main_with_a_saved_model_on_mmstar_with_image_gain(tmp_path, capsys):
    from vlm_course.vlm import VisionLanguageModel

    model_dir = VisionLanguageModel.from_profile("tiny").save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    argv = ["--model", str(model_dir), "--mmstar", str(MMSTAR_FIXTURE), "--limit", "3", "--max-new-tokens", "3",
            "--image-gain", "--out", str(out), "--no-progress"]
    assert eval_main(argv) == 0
    data = json.loads((out / "results.json").read_text())
    assert len(data["records"]) == 3 and "mmstar" in data["summary"]
    assert data["meta"]["model"] == f"model {model_dir}"
    gain = json.loads((out / "image_gain.json").read_text())
    assert gain["table"][-1]["subset"] == "overall"
    assert "Gain from the image" in capsys.readouterr().out


def test_eval_main_says_what_is_wrong_with_a_missing_model(tmp_path, capsys):
    assert eval_main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "eval")]) == 2
    assert "not a saved VisionLanguageModel" in capsys.readouterr().err
    assert not (tmp_path / "eval").exists()


def test_the_default_budget_fits_long_answers_and_a_short_one_is_flagged(processor):
    box = "[441, 671, 718, 948]"  # 20 SmolLM2 tokens: more than a fixed 16 would allow
    rows = [text_row("Where is the red object? Answer with a box.", box, "grounding")]
    model, result = run(processor, always(box), rows)
    assert result.records[0].score == 1.0 and result.meta["max_new_tokens"] == 28
    with pytest.warns(UserWarning, match="too short for the longest gold answer"):
        _, cut = run(processor, always(box), rows, max_new_tokens=16)
    assert cut.records[0].score == 0.0 and cut.records[0].prediction.startswith("[441, 671")
