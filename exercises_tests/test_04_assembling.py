"""Lesson 04, assembling the VLM: splice_image_features, make_labels, answer_loss.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l04_assembling.py (the same checks the notebook's check cells run).
"""

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner
from PIL import Image

from vlm_course.grading.inputs import randomised
from vlm_course.processing import VLMProcessor
from vlm_course.vlm import VisionLanguageModel

NOTEBOOK = "04_assembling_the_vlm.ipynb"


@pytest.mark.parametrize("exercise", lesson_exercises("04"))
def test_assembling(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("splice_image_features", "make_labels", "answer_loss")
def test_assembling_end_to_end(notebook):
    """On a real processor batch (batch 3: one image, two images, none) and a tiny random VLM, your make_labels
    gives the processor's labels, and your splice + answer_loss give exactly the model's own loss."""
    splice, make_labels, answer_loss = (learner_object(notebook, n) for n in (
        "splice_image_features", "make_labels", "answer_loss"))
    torch.manual_seed(0)
    model = randomised(VisionLanguageModel.from_profile("tiny"), seed=41)
    processor = VLMProcessor.from_config(model.config)
    images = [Image.new("RGB", (64, 64), "red"), [Image.new("RGB", (64, 64), "blue"), Image.new("RGB", (80, 48), "green")],
              []]
    batch = processor(images, ["What colour is it?", "Compare the two pictures.", "Say hi."],
                      ["Red.", "The first is blue, the second green.", "Hi!"])
    ids = batch["input_ids"]
    labels = run_learner("make_labels", make_labels, ids, processor.text_ids("<|im_start|>assistant\n"),
                         processor.eos_token_id)
    assert torch.equal(labels, batch["labels"]), "your make_labels differs from the processor's answer-only labels"
    with torch.no_grad():
        expected = model(**batch).loss
        is_image = ids == processor.image_token_id
        token_embeds = model.decoder.embed_tokens(ids.masked_fill(is_image, 0))
        embeds = run_learner("splice_image_features", splice, token_embeds, ids,
                             model.encode_images(batch["pixel_values"]), processor.image_token_id)
        logits = model.decoder(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).logits
        loss = run_learner("answer_loss", answer_loss, logits, labels)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"your splice + labels + loss differ from VisionLanguageModel's loss: {m}")
