"""docs/demo_experiments/reading_and_pointing.py runs end to end (tiny profile, two steps, a few rows) for both variants."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("reading_and_pointing",
                                                  ROOT / "docs" / "demo_experiments" / "reading_and_pointing.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("variant, tokens", [("single", 16), ("dual", 32)])
def test_the_experiment_trains_and_scores_both_images(tmp_path, variant, tokens):
    script = load_script()
    report = script.main(["--profile", "tiny", "--variant", variant, "--steps", "2", "--batch-size", "4",
                          "--train-per-task", "4", "--eval-per-task", "2", "--eval-batch-size", "8", "--log-every", "0",
                          "--out", str(tmp_path)])
    assert (tmp_path / f"{variant}.json").exists()
    assert report["token_budget"]["total_tokens"] == tokens and report["eval_rows"] == 4
    assert report["train_rows"] == 4 + 4 + 2 * 2  # ocr, grounding, and half as many of each other subset
    for image in ("right_image", "other_image"):
        scores = report[image]
        assert set(scores) >= {"ocr_anls", "grounding_acc50", "grounding_mean_iou"}
        assert all(0.0 <= scores[k] <= 1.0 for k in ("ocr_anls", "grounding_acc50", "grounding_mean_iou"))
        assert {task for task in scores["examples"]} == {"ocr", "grounding"}
    assert len(report["loss_curve"]) == 2 and report["cpu_seconds_per_step"] > 0
    if variant == "dual":  # without the vision stage the QLoRA run trains the second branch fully
        assert report["high_branch_trainable"] > 0


def test_the_vision_stage_runs_first_and_leaves_the_branch_frozen(tmp_path):
    """--vision-stage-steps: Vary's first stage on the second branch, then the same QLoRA run with it frozen."""
    script = load_script()
    report = script.main(["--profile", "tiny", "--variant", "dual", "--steps", "2", "--batch-size", "4",
                          "--train-per-task", "4", "--eval-per-task", "2", "--eval-batch-size", "8", "--log-every", "0",
                          "--vision-stage-steps", "2", "--vision-stage-batch-size", "4", "--vision-stage-ocr", "4",
                          "--vision-stage-scenes", "2", "--vision-stage-held-out", "2", "--out", str(tmp_path)])
    assert (tmp_path / "dual-vocab.json").exists() and report["variant"] == "dual-vocab"
    stage = report["vision_stage"]
    assert stage["steps"] == 2 and len(stage["loss_history"]) == 2
    assert 0.0 <= stage["solved"]["token_accuracy"] <= 1.0
    assert report["right_image"]["ocr_anls"] >= 0.0 and len(report["loss_curve"]) == 2
    assert report["high_branch_trainable"] == 0


def test_the_vision_stage_needs_two_branches():
    with pytest.raises(SystemExit):
        load_script().main(["--profile", "tiny", "--variant", "single", "--vision-stage-steps", "2"])


def test_the_other_image_run_really_swaps_pictures():
    """The 'other image' rows keep each question and answer but show another row's picture of the same task."""
    script = load_script()
    from vlm_course.evaluation import with_other_images

    rows = script.task_rows(1, 3, 3, 0)
    swapped = with_other_images(rows)
    assert [r["texts"] for r in swapped] == [r["texts"] for r in rows]
    assert all(a["images"][0] is not b["images"][0] for a, b in zip(rows, swapped))
    assert [r["source"] for r in swapped] == [r["source"] for r in rows]
