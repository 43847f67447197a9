"""The collator: padding, answer-only labels for every assistant turn, truncation that never cuts an answer."""

import pytest
import torch
from PIL import Image

from vlm_course.config import get_profile
from vlm_course.data.collate import AllSamplesDroppedError, VLMCollator
from vlm_course.processing import IGNORE_INDEX, VLMProcessor


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(get_profile("tiny").config, system_prompt="Answer briefly.")


def image(color=(200, 30, 30)):
    return Image.new("RGB", (64, 64), color)


def row(turns, n_images=1):
    return {"images": [image() for _ in range(n_images)],
            "texts": [{"user": u, "assistant": a, "source": "test"} for u, a in turns]}


def labelled_runs(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of trained (non -100) label positions."""
    runs, current = [], []
    for value in labels.tolist():
        if value == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(value)
    return runs + ([current] if current else [])


def test_multi_turn_labels_cover_exactly_each_answer_and_its_end_token(processor):
    turns = [("What colour is the square?", "Red."), ("How many squares?", "One square, in the middle."),
             ("Is it large?", "no")]
    short = [("Colour?", "red")]
    batch = VLMCollator(processor)([row(turns), row(short)])
    eos = processor.eos_token_id
    for i, conversation in enumerate((turns, short)):
        expected = [processor.text_ids(answer) + [eos] for _, answer in conversation]
        assert labelled_runs(batch["labels"][i]) == expected
        trained = batch["labels"][i] != IGNORE_INDEX
        assert torch.equal(batch["labels"][i][trained], batch["input_ids"][i][trained])
    # Right padding: the short row ends in padding that is masked out and never trained.
    length = int(batch["attention_mask"][1].sum())
    assert batch["attention_mask"][1, :length].all() and not batch["attention_mask"][1, length:].any()
    assert (batch["labels"][1, length:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, length:] == processor.pad_token_id).all()
    assert batch["pixel_values"].shape == (2, 3, 64, 64)
    # Image tokens are never trained.
    assert not ((batch["input_ids"] == processor.image_token_id) & (batch["labels"] != IGNORE_INDEX)).any()


def test_drop_skips_over_long_samples_and_counts_them(processor):
    collator = VLMCollator(processor, max_length=60, truncation="drop")
    long_row = row([("describe " * 80, "a red square")])
    ok_row = row([("Colour?", "red")])
    batch = collator([long_row, ok_row, ok_row])
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape[0] == 2
    assert (collator.seen, collator.kept, collator.dropped, collator.shortened) == (3, 2, 1, 0)
    assert "dropped 1" in collator.summary()


def test_all_dropped_batch_raises_a_clear_error(processor):
    collator = VLMCollator(processor, max_length=40)
    with pytest.raises(AllSamplesDroppedError, match="max_length=40.*raise max_length"):
        collator([row([("describe " * 80, "a red square")])] * 2)
    assert collator.dropped == 2


def test_shorten_prompt_drops_earliest_turns_keeps_image_block_and_last_answer(processor):
    turns = [(f"Question number {i} about the picture, asked at some length?", f"Answer {i}.") for i in range(6)]
    full_length = len(processor.encode_conversation([{"user": u, "assistant": a} for u, a in turns],
                                                    [image()])["input_ids"])
    max_length = full_length - 30
    collator = VLMCollator(processor, max_length=max_length, truncation="shorten_prompt")
    batch = collator([row(turns)])
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    assert len(ids) <= max_length
    assert int((ids == processor.image_token_id).sum()) == processor.tokens_per_image  # whole image block
    runs = labelled_runs(labels)
    assert runs[-1] == processor.text_ids("Answer 5.") + [processor.eos_token_id]  # the last answer, intact
    assert len(runs) < len(turns)  # earliest turns were removed, not cut in the middle
    for run in runs:
        assert run in [processor.text_ids(a) + [processor.eos_token_id] for _, a in turns]
    assert collator.shortened == 1 and collator.turns_dropped == len(turns) - len(runs)
    assert collator.prompts_cut == 0 and collator.dropped == 0
    assert "earliest turns removed" in collator.summary()


def test_shorten_prompt_cuts_the_start_of_a_long_user_message(processor):
    question = "blah " * 100 + "What colour is the square?"
    collator = VLMCollator(processor, max_length=70, truncation="shorten_prompt")
    batch = collator([row([(question, "Red.")])])
    ids = batch["input_ids"][0]
    assert len(ids) <= 70
    assert labelled_runs(batch["labels"][0]) == [processor.text_ids("Red.") + [processor.eos_token_id]]
    assert int((ids == processor.image_token_id).sum()) == processor.tokens_per_image
    text = processor.tokenizer.decode(ids)
    assert "What colour is the square?" in text and text.count("blah") < 100
    assert (collator.prompts_cut, collator.shortened, collator.dropped) == (1, 1, 0)


def test_shorten_prompt_drops_when_the_answer_alone_does_not_fit(processor):
    collator = VLMCollator(processor, max_length=40, truncation="shorten_prompt")
    with pytest.raises(AllSamplesDroppedError):
        collator([row([("Describe.", "word " * 60)])])
    assert (collator.dropped, collator.shortened) == (1, 0)


def test_bad_arguments(processor):
    with pytest.raises(ValueError, match="truncation"):
        VLMCollator(processor, truncation="cut")
    with pytest.raises(ValueError, match="over the processor's limit"):
        VLMCollator(processor, max_length=processor.config.max_length + 1)
