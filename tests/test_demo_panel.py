"""The instructor panel's scene composer, driven as its buttons drive it (no browser: tests/test_panel_browser.py)."""

import numpy as np
import pytest

from vlm_course import demo_panel
from vlm_course.data import synthetic


@pytest.fixture(scope="module")
def tiny_pair():
    """The demo architecture on the random `tiny` profile: fast, answers nothing sensible, exercises every step."""
    return demo_panel.load_untrained("tiny", checkpoint="/nonexistent")


@pytest.fixture()
def panel(tiny_pair):
    return demo_panel.scene_panel(tiny_pair, tiny_pair)


def _message(panel) -> str:
    return panel.message.value


def test_the_panel_opens_with_a_drawn_scene_and_a_question_the_scene_decides(panel):
    assert panel.objects_raw() == [("circle", "red", "top left"), ("square", "blue", "center")]
    assert panel.picture.value[:8] == b"\x89PNG\r\n\x1a\n"
    assert panel.scene_text.value == "red circle (top left), blue square (center)"
    assert panel.question.value == "What colour is the circle?"
    assert "In which part of the image is the blue square?" in panel.question.options
    assert _message(panel) == ""


def test_asking_shows_both_answers_and_both_overlays(panel):
    result = panel.ask()
    assert result is not None, _message(panel)
    assert set(result["answers"]) == {"untrained", "trained"} and result["truth"] == "red"
    for name, (image, text) in panel.columns.items():
        assert image.value[:8] == b"\x89PNG\r\n\x1a\n" and image.value != panel.blank, name
        assert f"<b>{name}</b>: <span class='vlm-answer-text'>" in text.value
        assert "of attention on the image" in text.value
        share = result["attention"][name].sum()
        assert 0 < share <= 1 + 1e-5
    assert panel.truth.value == "right answer: <b>red</b>"
    assert "asked: What colour is the circle?" in _message(panel)
    assert not panel.ask_button.disabled


def test_a_fifth_object_gets_a_message_and_no_answer(panel):
    for _ in range(3):
        panel.add_object()
    assert len(panel.rows) == 5
    assert len({o[2] for o in panel.objects_raw()}) == 5  # new rows take free cells: only the count is wrong
    assert "5 objects: a scene holds at most 4" in _message(panel)
    assert panel.picture.value == panel.blank
    assert panel.ask() is None
    assert "5 objects" in _message(panel) and "#b00020" in _message(panel)
    assert all("press <i>Ask both models</i>" in text.value and image.value == panel.blank
               for image, text in panel.columns.values())
    panel.remove_object(4)
    assert _message(panel) == "" and panel.picture.value != panel.blank


def test_two_objects_in_one_cell_get_a_message_naming_the_cell(panel):
    panel.rows[1].children[2].value = "top left"  # the square's cell picker
    assert "two objects in the top left cell" in _message(panel)
    assert panel.ask() is None and "two objects in the top left cell" in _message(panel)
    panel.rows[1].children[2].value = "bottom right"
    assert _message(panel) == ""
    assert "bottom right" in panel.scene_text.value


def test_an_empty_question_gets_a_message(panel):
    panel.question.value = "   "
    assert panel.ask() is None
    assert "the question is empty" in _message(panel)


def test_removing_every_object_says_the_scene_is_empty(panel):
    panel.remove_object(0)
    panel.remove_object(0)
    assert "the scene is empty" in _message(panel)
    assert panel.ask() is None


def test_a_model_failure_is_a_message_not_a_traceback(tiny_pair):
    class Broken:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    model, _ = tiny_pair
    panel = demo_panel.scene_panel(tiny_pair, (model, Broken()))
    assert panel.ask() is None
    assert "could not answer (RuntimeError: out of memory)" in _message(panel)
    assert not panel.ask_button.disabled


def test_the_panel_displays_as_a_widget(panel):
    bundle = panel._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == panel.widget.model_id


def test_ask_scene_refuses_bad_input_before_any_model_runs():
    from vlm_course.scene_composer import SceneError

    never = (None, None)  # a model call would fail with a TypeError, not a SceneError
    with pytest.raises(SceneError, match="two objects in the top cell"):
        demo_panel.ask_scene(never, never, [("circle", "red", "top"), ("square", "blue", "top")], "What?")
    with pytest.raises(SceneError, match="the question is empty"):
        demo_panel.ask_scene(never, never, [("circle", "red", "top")], "")


def test_png_bytes_of_an_overlay_array_round_trips():
    import io

    from PIL import Image

    array = np.zeros((4, 4, 3))
    array[0, 0] = (1.0, 0.0, 0.0)
    image = Image.open(io.BytesIO(demo_panel.png_bytes(array, size=8)))
    assert image.size == (8, 8) and image.getpixel((0, 0)) == (255, 0, 0) and image.getpixel((7, 7)) == (0, 0, 0)


# ----------------------------------------------------------------------------------------------
# The committed trained model reads composed scenes (real SmolLM2, offline GGUF)


@pytest.mark.slow
def test_the_trained_model_reads_composed_scenes_and_not_without_them():
    """Composed pictures are pictures it can read: right on most colour, shape and position questions about them,
    and near chance when each question gets another composed scene's picture."""
    from vlm_course.scene_composer import compose_scene, suggested_questions
    from vlm_course.vlm import answer
    from vlm_course.weights import assets_dir

    model, processor = demo_panel.load_demo_checkpoint(assets_dir() / "demo_checkpoint")
    rng = np.random.default_rng(2026)
    images, questions, gold = [], [], []
    for k in range(12):
        n = 1 + k % 4
        cells, shapes, colours = rng.permutation(9)[:n], rng.permutation(4)[:n], rng.permutation(6)[:n]
        scene = [(synthetic.SHAPES[s], synthetic.COLOURS[c], synthetic.POSITIONS[p])
                 for s, c, p in zip(shapes, colours, cells)]
        image, _ = compose_scene(scene, seed=k)
        asked = [(q, a) for q, a in suggested_questions(scene).items() if not q.startswith("How many")]
        q, a = asked[int(rng.integers(len(asked)))]
        images.append(image)
        questions.append(q)
        gold.append(a)
    right = answer(model, processor, images, questions, max_new_tokens=4)
    other = answer(model, processor, images[1:] + images[:1], questions, max_new_tokens=4)
    right_acc = np.mean([p == g for p, g in zip(right, gold)])
    other_acc = np.mean([p == g for p, g in zip(other, gold)])
    assert right_acc >= 0.7, list(zip(questions, right, gold))
    assert other_acc <= 0.35, list(zip(questions, other, gold))
