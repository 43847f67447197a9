"""The second, high-resolution vision branch (Vary-toy): token bookkeeping, parity of the first branch, save/load, errors."""

import dataclasses
import json

import pytest
import torch

from vlm_course.config import HighResConfig, VisionConfig, VLMConfig, get_profile
from vlm_course.data import reading, synthetic
from vlm_course.dual_vision import DualFeatures, DualProjector, add_high_res_branch, downsample, token_budget
from vlm_course.processing import VLMProcessor
from vlm_course.training import TrainConfig
from vlm_course.training.recipes import apply_recipe
from vlm_course.vlm import VisionLanguageModel, read_config_file


def tiny_high_res(size=128, patch=8, shuffle=4) -> HighResConfig:
    vision = dataclasses.replace(get_profile("tiny").config.vision, image_size=size, patch_size=patch)
    return HighResConfig(vision=vision, shuffle_factor=shuffle)


@pytest.fixture(scope="module")
def dual():
    torch.manual_seed(0)
    model = add_high_res_branch(VisionLanguageModel(get_profile("tiny").config), tiny_high_res())
    return model.eval(), VLMProcessor.from_config(model.config)


@pytest.fixture(scope="module")
def rows():
    return reading.small_print(3, seed=4)


def test_token_budget_counts_each_branch():
    config = get_profile("tiny").config  # 64 px / 8 px patches = 64 patches, shuffle 2 -> 16 tokens
    assert token_budget(config) == {"low_patches": 64, "low_tokens": 16, "total_tokens": 16}
    config.high_res = tiny_high_res(192, 16, 2)  # 192 / 16 = 12 x 12 = 144 patches, shuffle 2 -> 36
    assert token_budget(config) == {"low_patches": 64, "low_tokens": 16, "high_patches": 144, "high_tokens": 36,
                                    "total_tokens": 52}
    assert config.image_tokens_per_image == 52 and config.pixel_size == 192


def test_processor_writes_one_image_token_per_feature(dual, rows):
    model, processor = dual
    assert processor.tokens_per_image == 32
    batch = processor([r["images"][0] for r in rows], [r["texts"][0]["user"] for r in rows],
                      [r["texts"][0]["assistant"] for r in rows])
    assert batch["pixel_values"].shape == (3, 3, 128, 128)
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 3 * 32
    with torch.no_grad():
        features = model.encode_images(batch["pixel_values"])
        assert features.shape == (3, 32, model.config.decoder.hidden_size)
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_the_first_branch_reads_the_downsampled_pixels_as_before(dual, rows):
    """Adding the branch leaves the first branch's tokens unchanged: they equal a one-branch model with the same
    weights given the picture shrunk to 64 px (the first 16 tokens; the next 16 are the new branch's)."""
    torch.manual_seed(1)
    single = VisionLanguageModel(get_profile("tiny").config).eval()
    pixels = VLMProcessor.from_config(single.config).preprocess_images([r["images"][0] for r in rows])
    with torch.no_grad():
        before = single.encode_images(pixels)
        add_high_res_branch(single, tiny_high_res())
        big = VLMProcessor.from_config(single.config).preprocess_images([r["images"][0] for r in rows])
        after = single.encode_images(big)
    shrunk = downsample(big, 64)
    # the processor's bicubic 64 px resize and the antialiased 2x average differ slightly: compare the branch itself
    with torch.no_grad():
        reference = single.projector.low(single.vision.low(shrunk))
    torch.testing.assert_close(after[:, :16], reference, atol=1e-6, rtol=0)
    assert (shrunk - pixels).abs().mean() < 0.05  # the two ways of shrinking see nearly the same picture
    assert before.shape == (3, 16, before.shape[-1]) and after.shape[1] == 32


def test_copy_init_starts_the_second_vit_as_the_first_resized(dual):
    torch.manual_seed(2)
    model = VisionLanguageModel(get_profile("tiny").config)
    first = model.vision
    add_high_res_branch(model, tiny_high_res(), init="copy")
    assert model.vision.low is first
    expected = first.resized(128).state_dict()
    for name, tensor in model.vision.high.state_dict().items():
        torch.testing.assert_close(tensor, expected[name])
    random_init = add_high_res_branch(VisionLanguageModel(get_profile("tiny").config), tiny_high_res(), init="random")
    assert not torch.equal(random_init.vision.high.layers[0].mlp.fc1.weight, model.vision.high.layers[0].mlp.fc1.weight)


def test_save_and_load_round_trip(dual, rows, tmp_path):
    model, processor = dual
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["high_res"]["shuffle_factor"] == 4
    loaded = VisionLanguageModel.from_pretrained(tmp_path / "m")
    assert isinstance(loaded.projector, DualProjector) and loaded.config.high_res == model.config.high_res
    pixels = processor.preprocess_images([r["images"][0] for r in rows])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_images(pixels), model.encode_images(pixels))


def test_a_config_without_high_res_loads_as_one_branch(tmp_path):
    data = get_profile("tiny").config.to_dict()
    del data["high_res"]  # as every config.json saved before the field existed
    (tmp_path / "config.json").write_text(json.dumps(data))
    config = read_config_file(tmp_path / "config.json")
    assert config.high_res is None and config.image_tokens_per_image == 16
    data["high_res"] = {"vision": {**data["vision"], "image_size": "big"}, "shuffle_factor": 4}
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"high_res\.vision\.image_size should be int"):
        read_config_file(tmp_path / "config.json")


def test_training_vision_full_trains_both_branches(dual):
    model = add_high_res_branch(VisionLanguageModel(get_profile("tiny").config), tiny_high_res())
    counts = apply_recipe(model, TrainConfig(vision="full", projector="full", decoder="frozen"))
    vision = sum(p.numel() for p in model.vision.parameters())
    assert counts["vision"] == vision and vision == 2 * sum(p.numel() for p in model.vision.low.parameters()) + (
        model.vision.high.embeddings.position_embedding.weight.numel()
        - model.vision.low.embeddings.position_embedding.weight.numel())
    assert all(p.requires_grad for p in model.projector.high.parameters())


def test_an_image_too_small_for_the_high_res_branch_is_refused(dual):
    _, processor = dual
    small = synthetic.generate("ocr", 1, seed=0, image_size=64)[0]["images"][0]
    with pytest.raises(ValueError, match="smaller than the 128 px the high-resolution branch reads"):
        processor(small, "Provide the OCR results of this image.")


def test_pixels_at_the_wrong_size_are_refused(dual):
    model, _ = dual
    with pytest.raises(ValueError, match="high-resolution branch reads 128x128"):
        model.vision(torch.zeros(1, 3, 64, 64))
    with pytest.raises(TypeError, match="DualFeatures"):
        model.projector(torch.zeros(1, 64, 64))
    assert isinstance(model.vision(torch.zeros(1, 3, 128, 128)), DualFeatures)


def test_config_errors_say_what_to_do():
    base = get_profile("tiny").config
    with pytest.raises(ValueError, match="higher resolution"):
        dataclasses.replace(base, high_res=tiny_high_res(32, 8, 2))
    with pytest.raises(ValueError, match="image_layout='plain'"):
        dataclasses.replace(base, image_layout="grid", high_res=tiny_high_res())
    with pytest.raises(ValueError, match="not divisible by its pixel-shuffle factor"):
        HighResConfig(vision=VisionConfig(image_size=96, patch_size=8, hidden_size=64, intermediate_size=128,
                                          num_layers=1, num_heads=4), shuffle_factor=5)
    with pytest.raises(ValueError, match="image_mean"):
        high = tiny_high_res()
        high.vision.image_mean = (0.4, 0.4, 0.4)
        VLMConfig(vision=base.vision, projector=base.projector, decoder=base.decoder, high_res=high)
    with pytest.raises(ValueError, match="init='random'"):
        add_high_res_branch(VisionLanguageModel(base), tiny_high_res(128, 16, 2), init="copy")
    model = add_high_res_branch(VisionLanguageModel(base), tiny_high_res())
    with pytest.raises(ValueError, match="already has"):
        add_high_res_branch(model, tiny_high_res())
