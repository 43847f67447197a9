"""Processor: image conversion, chat template agreement with transformers, answer-only labels, padding."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vlm_course.config import get_profile
from vlm_course.processing import IGNORE_INDEX, VLMProcessor, to_rgb


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(get_profile("tiny").config)


def image(mode="RGB", size=(50, 40)):
    if mode == "I;16":
        return Image.fromarray((np.arange(size[0] * size[1]).reshape(size[1], size[0]) * 7).astype(np.uint16))
    return Image.new(mode, size, {"RGB": (200, 10, 10), "L": 128, "LA": (128, 0), "RGBA": (255, 0, 0, 0),
                                  "P": 3, "CMYK": (0, 255, 255, 0), "1": 1}[mode])


@pytest.mark.parametrize("mode", ["RGB", "L", "LA", "RGBA", "P", "CMYK", "I;16", "1"])
def test_every_mode_becomes_rgb(processor, mode):
    pixels = processor.image_transform(image(mode))
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.float32
    assert -1.0 <= pixels.min() and pixels.max() <= 1.0  # SigLIP normalisation maps [0, 1] to [-1, 1]


def test_transparent_pixels_become_white_not_black():
    assert to_rgb(image("RGBA")).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_range_is_rescaled():
    rgb = np.asarray(to_rgb(image("I;16")))
    assert rgb.min() == 0 and rgb.max() == 255


def test_bad_images_are_explained(processor):
    with pytest.raises(ValueError, match="smaller than one"):
        processor.image_transform(Image.new("RGB", (4, 100)))
    with pytest.raises(ValueError, match="decode"):
        processor.image_transform(b"not an image at all")
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(png, format="PNG")
    with pytest.raises(ValueError, match="truncated|corrupt|decode"):
        processor.image_transform(png.getvalue()[:60])


def template_ids(tokenizer, turns, system=None, add_generation_prompt=False):
    messages = [{"role": "system", "content": system}] if system is not None else []
    for turn in turns:
        messages.append({"role": "user", "content": turn["user"]})
        if "assistant" in turn:
            messages.append({"role": "assistant", "content": turn["assistant"]})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=True)["input_ids"]


@pytest.mark.parametrize("turns", [
    [{"user": "What colour is the square?", "assistant": "red"}],
    [{"user": "How many circles?", "assistant": "3"}, {"user": "And squares?", "assistant": "two, I think."}],
    [{"user": "Résumé: naïve café ünïcode 東京?", "assistant": " spaced answer "}],
])
def test_our_tokens_equal_the_chat_template(processor, turns):
    """We tokenise piece by piece (to know where answers are); the result must equal the library's template."""
    ours = processor.encode_conversation(turns)["input_ids"].tolist()
    assert ours == template_ids(processor.tokenizer, turns)
    short = VLMProcessor(processor.tokenizer, processor.config, system_prompt="Answer briefly.")
    assert short.encode_conversation(turns)["input_ids"].tolist() == template_ids(
        processor.tokenizer, turns, system="Answer briefly.")


def test_generation_prompt_equals_the_chat_template(processor):
    ours = processor.encode_prompt("Is it big?")["input_ids"].tolist()
    assert ours == template_ids(processor.tokenizer, [{"user": "Is it big?"}], add_generation_prompt=True)


def test_image_tokens_expand_before_the_text(processor):
    encoded = processor.encode_conversation([{"user": "Describe.", "assistant": "A dot."}], [image(), image()])
    ids = encoded["input_ids"]
    n = processor.tokens_per_image
    assert n == 16  # tiny: (64 / 8)^2 patches / 2^2
    is_image = (ids == processor.image_token_id).nonzero().flatten()
    assert len(is_image) == 2 * n
    assert torch.equal(is_image, torch.arange(is_image[0], is_image[0] + 2 * n))  # one contiguous run
    text = template_ids(processor.tokenizer, [{"user": "<image>" * (2 * n) + "Describe.", "assistant": "A dot."}])
    assert ids.tolist() == text
    assert encoded["pixel_values"].shape == (2, 3, 64, 64)


def test_image_markers_place_images(processor):
    ids = processor.encode_conversation([{"user": "Left <image> right <image>?", "assistant": "yes"}],
                                        [image(), image()])["input_ids"]
    text = processor.decode(ids, skip_special_tokens=False)
    assert "Left " + "<image>" * 16 + " right " + "<image>" * 16 + "?" in text
    with pytest.raises(ValueError, match="markers"):
        processor.encode_conversation([{"user": "only <image> one", "assistant": "x"}], [image(), image()])


def test_labels_cover_every_answer_and_its_end_token(processor):
    turns = [{"user": "Q1?", "assistant": "first answer"}, {"user": "Q2?", "assistant": "second"}]
    encoded = processor.encode_conversation(turns, [image()])
    ids, labels = encoded["input_ids"], encoded["labels"]
    trained = labels != IGNORE_INDEX
    assert torch.equal(labels[trained], ids[trained])
    tok = processor.tokenizer
    expected = (tok("first answer", add_special_tokens=False)["input_ids"] + [processor.eos_token_id]
                + tok("second", add_special_tokens=False)["input_ids"] + [processor.eos_token_id])
    assert labels[trained].tolist() == expected
    assert not trained[ids == processor.image_token_id].any()


def test_empty_and_overlong_text_are_explained(processor):
    with pytest.raises(ValueError, match="no turns"):
        processor.encode_conversation([])
    with pytest.raises(ValueError, match="empty user"):
        processor.encode_conversation([{"user": "  ", "assistant": "x"}])
    with pytest.raises(ValueError, match="empty assistant"):
        processor.encode_conversation([{"user": "q", "assistant": ""}])
    with pytest.raises(ValueError, match="max_length"):
        processor.encode_conversation([{"user": "word " * 600, "assistant": "x"}])


def test_padding_sides(processor):
    train = processor([image(), image()], ["Short?", "A much longer question here?"], ["a", "b"])
    gen = processor([image(), image()], ["Short?", "A much longer question here?"])
    assert train["attention_mask"][0, -1] == 0 and train["attention_mask"][0, 0] == 1  # right padding
    assert gen["attention_mask"][0, 0] == 0 and gen["attention_mask"][0, -1] == 1  # left padding
    assert (train["labels"][train["attention_mask"] == 0] == IGNORE_INDEX).all()
    assert gen["pixel_values"].shape == (2, 3, 64, 64)
    with pytest.raises(ValueError, match="images for"):
        processor([image()], ["q1", "q2"])


def test_grid_layout_writes_each_blocks_place_before_its_tokens():
    from vlm_course.config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
    from vlm_course.processing import POSITION_WORDS, VLMProcessor, grid_labels

    config = VLMConfig(vision=VisionConfig(image_size=72, patch_size=8, hidden_size=16, intermediate_size=32,
                                           num_layers=1, num_heads=2),
                       projector=ProjectorConfig(shuffle_factor=3, tokens_per_block=2),
                       decoder=DecoderConfig(hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                                             num_kv_heads=1), image_layout="grid", max_length=256)
    assert config.image_tokens_per_image == 18
    processor = VLMProcessor.from_config(config, system_prompt=None)
    ids = processor.encode_prompt("Where is the red circle?", [Image.new("RGB", (64, 64))])["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 18
    text = processor.tokenizer.decode(ids)
    expected = "".join(f" {label}<image><image>" for label in POSITION_WORDS) + "\n"
    assert expected in text
    assert grid_labels(2) == ["row 1 col 1", "row 1 col 2", "row 2 col 1", "row 2 col 2"]
    plain = VLMProcessor.from_config(VLMConfig.from_dict({**config.to_dict(), "image_layout": "plain"}),
                                     system_prompt=None)
    assert plain.image_block == [plain.image_token_id] * 18
