"""Vary's first stage for the second branch: per-token word targets, the least-squares projector, the training loop."""

import dataclasses

import pytest
import torch

from vlm_course.config import HighResConfig, get_profile
from vlm_course.data import synthetic
from vlm_course.dual_vision import add_high_res_branch
from vlm_course.processing import VLMProcessor
from vlm_course.vision_vocabulary import (
    FILLER,
    VocabularyConfig,
    high_tokens,
    ocr_targets,
    refit_projector,
    relative_error,
    scene_targets,
    train_vision_vocabulary,
    vocabulary_data,
    vocabulary_scores,
)
from vlm_course.vlm import VisionLanguageModel


@pytest.fixture(scope="module")
def dual():
    torch.manual_seed(0)
    vision = dataclasses.replace(get_profile("tiny").config.vision, image_size=128)
    model = add_high_res_branch(VisionLanguageModel(get_profile("tiny").config),
                                HighResConfig(vision=vision, shuffle_factor=4))
    return model.eval(), VLMProcessor.from_config(model.config)


@pytest.fixture(scope="module")
def data(dual):
    return vocabulary_data(*dual, n_ocr=6, n_scenes=4, seed=5)


def test_an_ocr_picture_says_its_answer_ids_in_order(dual):
    _, processor = dual
    ids = processor.text_ids("juice")
    assert len(ids) == 2  # "ju" "ice" in SmolLM2's tokenizer: the repeat must keep the order
    assert ocr_targets(processor, "juice", 5) == [ids[0], ids[1], ids[0], ids[1], ids[0]]
    assert ocr_targets(processor, "ship", 3) == processor.text_ids("ship") * 3


def test_a_scene_names_the_colour_in_the_block_of_each_centre(dual):
    _, processor = dual
    filler, red, blue = (processor.text_ids(w)[0] for w in (FILLER, " red", " blue"))
    small = synthetic.Shape("circle", "red", cx=100.0, cy=10.0, size=10.0)  # row 0, column 3 of a 4 x 4 grid
    large = synthetic.Shape("square", "blue", cx=40.0, cy=70.0, size=30.0)  # row 2, column 1
    targets = scene_targets(processor, [small, large], side=4, image_size=128)
    assert targets[3] == red and targets[2 * 4 + 1] == blue
    assert targets.count(filler) == 14
    shared = synthetic.Shape("square", "blue", cx=110.0, cy=20.0, size=30.0)  # same block as the small circle
    assert scene_targets(processor, [small, shared], side=4, image_size=128)[3] == blue  # the larger one wins


def test_data_has_one_target_per_token_of_the_branch(dual, data):
    model, _ = dual
    assert data["pixels"].shape == (10, 3, 128, 128)
    assert data["targets"].shape == (10, model.config.high_res.tokens_per_image)
    assert data["kind"].tolist() == [0] * 6 + [1] * 4


def test_relative_error_is_zero_at_the_word_and_one_at_zero():
    target = torch.randn(2, 3, 8)
    assert torch.allclose(relative_error(target, target), torch.zeros(2, 3))
    assert torch.allclose(relative_error(torch.zeros_like(target), target), torch.ones(2, 3))


def test_refit_projector_is_the_ridge_solution(dual):
    """The solved projector equals ridge regression solved another way: torch.linalg.lstsq (SVD) on the block
    vectors stacked over sqrt(penalty) * I, targets over zeros. Both in float64, the weights kept in float32:
    1e-4 relative on the ridge objective. (With no penalty the normal equations of a random ViT's nearly
    collinear block vectors blow up: that is why the stage always keeps one.)"""
    model, processor = dual
    data = vocabulary_data(model, processor, n_ocr=30, n_scenes=10, seed=6)
    proj = model.projector.high.proj
    assert proj.bias is None  # the course's projectors have none; refit_projector adds a column when they do
    with torch.no_grad():
        x = model.projector.high.blocks(model.vision.high(data["pixels"].float())).flatten(0, 1).double()
    y = model.decoder.embed_tokens.weight.detach().double()[data["targets"].flatten()]
    ridge = 1e-2
    penalty = ridge * (x * x).sum(0).mean()
    stacked_x = torch.cat([x, penalty.sqrt() * torch.eye(x.shape[1], dtype=x.dtype)])
    stacked_y = torch.cat([y, torch.zeros(x.shape[1], y.shape[1], dtype=y.dtype)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y, driver="gelsd").solution

    def objective(w):
        return (x @ w - y).pow(2).sum() + penalty * w.pow(2).sum()

    refit_projector(model, data, ridge=ridge)
    got = proj.weight.detach().double().T
    assert objective(got) <= (1 + 1e-4) * objective(expected)
    assert torch.allclose(got, expected, rtol=1e-3, atol=1e-3 * float(expected.abs().max()))
    assert objective(got) < 0.9 * y.pow(2).sum()  # a fit: well below the targets' own energy


def test_refit_brings_the_tokens_to_the_words(dual, data):
    model, _ = dual
    before = vocabulary_scores(model, data)["relative_error"]
    refit_projector(model, data, ridge=1e-3)
    after = vocabulary_scores(model, data)
    assert after["relative_error"] < 0.5 * before
    tokens = high_tokens(model, data["pixels"][:2].float())
    assert tokens.shape == (2, model.config.high_res.tokens_per_image, model.config.decoder.hidden_size)


def test_the_stage_trains_only_the_second_branch(dual):
    model, processor = dual
    untouched = {n: p.detach().clone() for n, p in model.named_parameters()
                 if not (n.startswith("vision.high.") or n.startswith("projector.high."))}
    high_vit = [p.detach().clone() for p in model.vision.high.parameters()]
    report = train_vision_vocabulary(model, processor, VocabularyConfig(steps=2, batch_size=4, ocr_images=6,
                                                                        scene_images=2, held_out=2, warmup_steps=1))
    assert len(report["loss_history"]) == 2 and set(report) >= {"before", "solved_first", "trained", "solved", "seconds"}
    assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if n in untouched)
    assert any(not torch.equal(a, b) for a, b in zip(high_vit, model.vision.high.parameters()))


def test_a_one_branch_model_is_refused():
    model = VisionLanguageModel(get_profile("tiny").config)
    processor = VLMProcessor.from_config(model.config)
    with pytest.raises(TypeError, match="add_high_res_branch"):
        train_vision_vocabulary(model, processor, VocabularyConfig(steps=1))
