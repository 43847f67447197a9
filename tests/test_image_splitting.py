"""Image splitting (Idefics3 / SmolVLM): the course's tiles, prompt and model against transformers'.

transformers' side is built locally, no hub: its Idefics3 image processor (the PIL backend, the one transformers uses
without torchvision, as here) from keyword arguments, and Idefics3Processor on the course's SmolLM2 tokenizer with the
Idefics3 markers added. Sizes are small (64 px tiles of a tiny encoder) so the whole file runs in seconds.

Tolerances. Pixels: both sides make the same PIL calls on the same uint8 image (resize, resize, crop, resize, with
the same filter), so the uint8 views are identical; what is left is float32 rounding in x / 255, (x - mean) / std,
done in another order (numpy there, torch here): below 1e-6 on the [-1, 1] scale, while one grey level is 2/255 ~
8e-3, so a one-level difference anywhere fails. Logits: LOGIT_ATOL as in test_save_idefics3 (same fp32 weights,
other kernels; a wrong tile order, marker or position moves them by > 1e-2).
"""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from vlm_course.config import VLMConfig, get_profile
from vlm_course.image_splitting import (
    image_prompt_string,
    image_token_count,
    row_col_tokens,
    split_grid,
    split_image,
)
from vlm_course.processing import VLMProcessor

PIXEL_ATOL = 1e-6
LOGIT_ATOL = 1e-4
QUESTION = "What is written in the corner?"
# width x height: square, wide, tall, smaller than a tile (upscaled, then split), exact multiples of the tile, odd
# sizes that hit the even rounding, and an extreme strip
SIZES = [(96, 96), (150, 100), (100, 150), (40, 30), (128, 64), (64, 128), (128, 128), (201, 77), (300, 20),
         (17, 333)]


def photo(width, height, seed=0):
    """Random pixels with a shape on top: every resampling error shows, and the tiles differ from each other."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    ImageDraw.Draw(image).ellipse((width // 5, height // 5, 3 * width // 5, 4 * height // 5), fill=(250, 20, 20))
    return image


def hf_image_processor(longest_edge, tile_size, splitting=True, resample=3):
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    return Idefics3ImageProcessorPil(
        do_convert_rgb=True, do_resize=True, size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile_size}, do_image_splitting=splitting, resample=resample,
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pad=True)


def course_config(longest_edge=128, vision=None) -> VLMConfig:
    config = get_profile("tiny").config
    if vision is not None:
        config.vision = vision
    config.image_layout, config.image_splitting, config.split_longest_edge = "idefics3", True, longest_edge
    return VLMConfig.from_dict(config.to_dict())  # validated as a saved config would be


def hf_processor_for(processor: VLMProcessor):
    """transformers' Idefics3Processor on the course processor's own tokenizer, with its image sizes and prompt."""
    from transformers import Idefics3Processor

    from vlm_course.vlm import chatml_template

    config = processor.config
    image_processor = hf_image_processor(config.image_longest_edge, config.vision.image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Idefics3Processor(image_processor, processor.tokenizer, image_seq_len=config.image_tokens_per_image,
                                 chat_template=chatml_template(processor.system_prompt))


def hf_inputs(hf_processor, images, question=QUESTION, **kwargs):
    messages = [{"role": "user", "content": [*({"type": "image"} for _ in images), {"type": "text", "text": question}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    return hf_processor(text=text, images=list(images), return_tensors="pt", **kwargs)


def to_course_tensor(view):
    return (torch.from_numpy(np.asarray(view, dtype=np.float32).copy()).permute(2, 0, 1) / 255 - 0.5) / 0.5


# ----------------------------------------------------------------------------------------------
# The tiles


@pytest.mark.parametrize("longest_edge,tile_size", [(128, 64), (100, 64), (192, 64), (64, 64)])
@pytest.mark.parametrize("width,height", SIZES)
def test_split_image_matches_transformers(width, height, longest_edge, tile_size):
    image = photo(width, height)
    hf = hf_image_processor(longest_edge, tile_size)(images=[image], return_tensors="pt", return_row_col_info=True)
    cut = split_image(image, longest_edge, tile_size)
    assert (cut.rows, cut.cols) == (hf["rows"][0][0], hf["cols"][0][0])
    assert (cut.rows, cut.cols) == split_grid(width, height, longest_edge, tile_size)
    assert len(cut.tiles) == cut.rows * cut.cols and len(cut.views) == hf["pixel_values"].shape[1]
    assert all(view.size == (tile_size, tile_size) for view in cut.views)
    ours = torch.stack([to_course_tensor(view) for view in cut.views])
    torch.testing.assert_close(ours, hf["pixel_values"][0], atol=PIXEL_ATOL, rtol=0)


def test_grid_examples():
    """The grids the sizes imply, spelled out: every image is first scaled to the longest edge (a small one *up*)."""
    assert split_grid(40, 30, 128, 64) == (2, 2)  # 40 x 30 -> 128 x 96 -> 128 x 128
    assert split_grid(300, 20, 128, 64) == (1, 2)  # 300 x 20 -> 128 x 8 -> 128 x 64
    assert split_grid(64, 64, 64, 64) == (0, 0)  # one tile: not split
    assert split_grid(2048, 1536, 2048, 512) == (3, 4)  # SmolVLM: 2048 x 1536 -> 4 x 3 tiles of 512
    assert split_grid(1456, 1456, 1456, 364) == (4, 4)  # Idefics3's largest grid


@pytest.mark.parametrize("width,height", [(150, 100), (100, 150), (40, 30)])
def test_split_image_lanczos_as_smolvlm(width, height):
    """SmolVLM's checkpoints resize with Lanczos: same PIL filter on both sides, same pixels."""
    image = photo(width, height, seed=3)
    hf = hf_image_processor(128, 64, resample=1)(images=[image], return_tensors="pt")
    cut = split_image(image, 128, 64, resample=Image.Resampling.LANCZOS)
    torch.testing.assert_close(torch.stack([to_course_tensor(v) for v in cut.views]), hf["pixel_values"][0],
                               atol=PIXEL_ATOL, rtol=0)


@pytest.mark.parametrize("width,height", [(150, 100), (40, 30), (64, 64)])
def test_no_splitting_matches_transformers(width, height):
    """splitting=False is do_image_splitting=False: the longest-edge resize, then one square view."""
    image = photo(width, height, seed=1)
    hf = hf_image_processor(128, 64, splitting=False)(images=[image], return_tensors="pt", return_row_col_info=True)
    cut = split_image(image, 128, 64, splitting=False)
    assert (cut.rows, cut.cols, cut.tiles) == (0, 0, []) == (hf["rows"][0][0], hf["cols"][0][0], [])
    torch.testing.assert_close(to_course_tensor(cut.global_image)[None], hf["pixel_values"][0], atol=PIXEL_ATOL, rtol=0)


def test_tiles_are_the_resized_image_row_by_row():
    """Pasting the tiles back, row by row, gives the image the split cut (no overlap, no gap, no reordering)."""
    image = photo(201, 77)
    cut = split_image(image, 192, 64)
    assert (cut.rows, cut.cols) == (2, 3)
    whole = image.resize((192, 74), Image.Resampling.BICUBIC).resize((192, 128), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (cut.cols * 64, cut.rows * 64))
    for i, tile in enumerate(cut.tiles):
        canvas.paste(tile, ((i % cut.cols) * 64, (i // cut.cols) * 64))
    assert np.array_equal(np.asarray(canvas), np.asarray(whole))
    assert np.array_equal(np.asarray(cut.global_image), np.asarray(whole.resize((64, 64), Image.Resampling.BICUBIC)))


def test_bad_input_is_refused_with_what_to_do():
    image = photo(50, 40)
    for longest_edge, tile_size in ((0, 64), (128, -1), (128.0, 64), (128, True)):
        with pytest.raises(ValueError, match="positive whole number"):
            split_image(image, longest_edge, tile_size)
    with pytest.raises(ValueError, match="larger than the longest edge.*turn splitting off"):
        split_image(image, 64, 128)
    with pytest.raises(ValueError, match="under 8 px on a side"):
        split_image(photo(5, 40), 128, 64, min_side=8)
    with pytest.raises(ValueError, match="under 1 px"):
        split_image(Image.new("RGB", (0, 10)), 128, 64)
    with pytest.raises(TypeError, match="PIL image"):
        split_image(np.zeros((40, 50, 3), np.uint8), 128, 64)
    with pytest.raises(ValueError, match="both are 0"):
        image_prompt_string(2, 0, 16)
    with pytest.raises(ValueError, match=">= 0"):
        image_prompt_string(-1, 2, 16)
    with pytest.raises(ValueError, match="image_seq_len must be positive"):
        image_prompt_string(1, 1, 0)


# ----------------------------------------------------------------------------------------------
# The prompt


@pytest.fixture(scope="module")
def processors():
    processor = VLMProcessor.from_config(course_config())
    return processor, hf_processor_for(processor)


@pytest.mark.parametrize("rows,cols", [(0, 0), (1, 1), (2, 3), (3, 1)])
def test_prompt_string_matches_idefics3_processor(processors, rows, cols):
    _, hf = processors
    expected = hf.replace_image_token({"rows": [[rows]], "cols": [[cols]]}, 0)
    assert image_prompt_string(rows, cols, hf.image_seq_len) == expected
    assert image_prompt_string(rows, cols, 5, "<F>", "<I>", "<G>") == expected.replace(
        "<fake_token_around_image>", "<F>").replace("<image>" * hf.image_seq_len, "<I>" * 5).replace("<global-img>", "<G>")


def test_prompt_layout_spelled_out():
    assert image_prompt_string(1, 2, 2, "F", "i", "G") == "F<row_1_col_1>iiF<row_1_col_2>ii\n\nFGiiF"
    assert image_prompt_string(0, 0, 3, "F", "i", "G") == "FGiiiF"


@pytest.mark.parametrize("width,height", [(150, 100), (100, 150), (40, 30), (128, 64), (300, 20)])
def test_input_ids_and_pixels_match_idefics3_processor(processors, width, height):
    processor, hf = processors
    image = photo(width, height, seed=2)
    theirs = hf_inputs(hf, [image])
    ours = processor([image], [QUESTION])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"][0], atol=PIXEL_ATOL, rtol=0)
    rows, cols = split_grid(width, height, 128, 64)
    n = processor.tokens_per_image
    # the image's block is where transformers' own count says, with every marker one token
    counted = hf._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
    assert counted == image_token_count(rows, cols, n)
    image_positions = int((ours["input_ids"] == processor.image_token_id).sum())
    assert image_positions == (rows * cols + 1) * n


def test_two_images_in_one_prompt(processors):
    processor, hf = processors
    images = [photo(150, 100, seed=4), photo(64, 128, seed=5)]
    theirs = hf_inputs(hf, images)
    ours = processor([images], [QUESTION])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    real = theirs["pixel_values"][0][: ours["pixel_values"].shape[0]]
    torch.testing.assert_close(ours["pixel_values"], real, atol=PIXEL_ATOL, rtol=0)


def test_tile_markers_are_single_tokens(processors):
    processor, _ = processors
    for token in row_col_tokens(6):
        assert len(processor.text_ids(token)) == 1, token
    ids = processor.text_ids(image_prompt_string(2, 2, processor.tokens_per_image))
    assert len(ids) == image_token_count(2, 2, processor.tokens_per_image)


def test_splitting_stays_off_by_default_and_needs_the_idefics3_layout():
    for name in ("tiny", "smol", "nano"):
        assert get_profile(name).config.image_splitting is False
    config = get_profile("tiny").config
    processor = VLMProcessor.from_config(config)
    assert "<row_1_col_1>" not in processor.tokenizer.get_vocab()
    assert processor.preprocess_images([photo(150, 100)]).shape == (1, 3, 64, 64)
    with pytest.raises(ValueError, match="image_layout='idefics3'"):
        VLMConfig.from_dict({**config.to_dict(), "image_splitting": True})
    with pytest.raises(ValueError, match="below the tile size"):
        course_config(longest_edge=32)
    assert course_config(longest_edge=None).image_longest_edge == 4 * 64


# ----------------------------------------------------------------------------------------------
# The model: logits against transformers' Idefics3ForConditionalGeneration


def tiny_idefics3(processor, tied=True, seed=0):
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    vision = processor.config.vision
    cfg = Idefics3Config(
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=vision.intermediate_size,
                           num_hidden_layers=vision.num_layers, num_attention_heads=vision.num_heads,
                           image_size=vision.image_size, patch_size=vision.patch_size),
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=len(processor.tokenizer), tie_word_embeddings=tied),
        scale_factor=processor.config.projector.shuffle_factor, image_token_id=processor.image_token_id,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(seed)
    return Idefics3ForConditionalGeneration(cfg).eval()


def test_from_idefics3_logits_match_with_splitting(tmp_path):
    """A tiny random Idefics3 with its split-image processor, saved and loaded into the course model: the course
    processor builds the same inputs from the folder, and the logits agree (a batch of a wide and a tall image, and
    one prompt with two images). Untied head; tests/test_vlm.py covers the tied one's loading."""
    from vlm_course.vlm import VisionLanguageModel

    builder = VLMProcessor.from_config(course_config(longest_edge=96))
    hf_model, hf = tiny_idefics3(builder, tied=False), hf_processor_for(builder)
    hf_model.save_pretrained(tmp_path)
    hf.save_pretrained(tmp_path)
    ours = VisionLanguageModel.from_idefics3(tmp_path)
    assert (ours.config.image_splitting, ours.config.image_longest_edge) == (True, 96)
    processor = VLMProcessor.from_config(ours.config)
    images = [photo(150, 100, seed=6), photo(60, 130, seed=7)]
    cases = [  # (images per prompt, one prompt each)
        ([[images[0]], [images[1]]], [QUESTION, "And here?"]),
        ([images], ["Compare them."]),
    ]
    for batch_images, questions in cases:
        mine = processor(batch_images, questions, padding_side="right")
        theirs = [hf_inputs(hf, imgs, q) for imgs, q in zip(batch_images, questions)]
        for row, t in enumerate(theirs):
            n = t["input_ids"].shape[1]
            assert mine["input_ids"][row, :n].tolist() == t["input_ids"][0].tolist()
        with torch.no_grad():
            got = ours(mine["input_ids"], mine["pixel_values"], mine["attention_mask"]).logits
            for row, t in enumerate(theirs):
                expected = hf_model(**t).logits[0]
                n = expected.shape[0]
                torch.testing.assert_close(got[row, :n], expected, atol=LOGIT_ATOL, rtol=0)


def test_save_idefics3_round_trip_with_splitting(tmp_path):
    """The course model with splitting on, saved as Idefics3: transformers' AutoProcessor reads the folder and builds
    our ids and pixels, Idefics3ForConditionalGeneration gives our logits, and from_idefics3 reads it back split."""
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    from vlm_course.vlm import VisionLanguageModel

    torch.manual_seed(0)
    model = VisionLanguageModel(course_config(longest_edge=128))
    processor = VLMProcessor.from_config(model.config)
    model.resize_vocabulary(len(processor.tokenizer)).eval()
    with torch.no_grad():  # distinct rows for the added markers, so a misplaced one would show
        model.decoder.embed_tokens.weight[49152:].normal_(0, 0.02)
    folder = model.save_idefics3(tmp_path / "split", processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf_processor = AutoProcessor.from_pretrained(folder)
    hf_model = Idefics3ForConditionalGeneration.from_pretrained(folder).eval()
    image = photo(100, 150, seed=8)
    theirs = hf_inputs(hf_processor, [image])
    ours = processor([image], [QUESTION])
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], theirs["pixel_values"][0], atol=PIXEL_ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(ours["input_ids"], ours["pixel_values"]).logits, hf_model(**theirs).logits,
                                   atol=LOGIT_ATOL, rtol=0)
    # greedy decoding with the KV cache: the same tokens (up to and including <|im_end|> if it comes)
    hf_new = hf_model.generate(**theirs, max_new_tokens=6, do_sample=False)[0, theirs["input_ids"].shape[1]:].tolist()
    our_new = model.generate(ours["input_ids"], ours["pixel_values"], ours["attention_mask"], max_new_tokens=6,
                             eos_token_id=processor.eos_token_id)[0].tolist()
    if processor.eos_token_id in hf_new:
        hf_new = hf_new[:hf_new.index(processor.eos_token_id) + 1]
    assert our_new == hf_new
    again = VisionLanguageModel.from_idefics3(folder)
    assert (again.config.image_splitting, again.config.image_longest_edge) == (True, 128)
    assert VLMProcessor.from_config(again.config)([image], [QUESTION])["input_ids"].tolist() == ours["input_ids"].tolist()


def test_a_split_model_saves_and_loads_as_itself(tmp_path):
    """The two config fields go through config.json (checked key by key when it is read back)."""
    from vlm_course.vlm import VisionLanguageModel

    model = VisionLanguageModel(course_config(longest_edge=192))
    again = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "split"))
    assert (again.config.image_splitting, again.config.split_longest_edge) == (True, 192)
    processor = VLMProcessor.from_config(again.config)
    assert processor.preprocess_images([photo(201, 77)]).shape == (2 * 3 + 1, 3, 64, 64)
