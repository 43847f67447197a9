"""Smoke tests for the offline demo and the course's small ViT (fast: tiny profile, a few steps)."""

import json
import math

import pytest
import torch

from vlm_course import demo, pretrain_vit
from vlm_course.config import get_profile
from vlm_course.data import synthetic
from vlm_course.processing import VLMProcessor
from vlm_course.vision import VisionEncoder
from vlm_course.vlm import VisionLanguageModel
from vlm_course.weights import assets_dir

# ----------------------------------------------------------------------------------------------
# The committed ViT (assets/vit_smol)


def test_vit_smol_asset_loads_with_the_smol_config():
    folder = assets_dir() / "vit_smol"
    size_mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    assert size_mb < 20, f"assets/vit_smol is {size_mb:.1f} MB; the budget is 20 MB"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "siglip_vision_model"
    encoder = VisionEncoder.from_siglip("course-vit-smol")
    expected = get_profile("smol").config.vision
    for name in ("image_size", "patch_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
        assert getattr(encoder.cfg, name) == getattr(expected, name), name
    out = encoder(torch.randn(2, 3, expected.image_size, expected.image_size))
    assert out.shape == (2, expected.num_patches, expected.hidden_size)
    assert torch.isfinite(out).all()


def test_vit_smol_asset_matches_transformers_siglip():
    from transformers import SiglipVisionModel

    folder = assets_dir() / "vit_smol"
    ours = VisionEncoder.from_siglip(folder)
    theirs = SiglipVisionModel.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(pixel_values=x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_vit_smol_separates_colours():
    """The pretrained patches carry colour: a red and a blue square give clearly different features."""
    from PIL import Image

    from vlm_course.processing import ImageTransform

    encoder = VisionEncoder.from_siglip("course-vit-smol")
    transform = ImageTransform(encoder.cfg)
    images = []
    for colour in ((215, 35, 35), (35, 85, 225), (215, 35, 35)):
        image = Image.new("RGB", (64, 64), (235, 235, 235))
        image.paste(colour, (16, 16, 40, 40))
        images.append(transform(image))
    with torch.no_grad():
        red, blue, red_again = encoder(torch.stack(images)).mean(1)
    assert (red - blue).norm() > 5 * (red - red_again).norm() + 1e-3


# ----------------------------------------------------------------------------------------------
# ViT pretraining pieces


def test_patch_labels_mark_the_covered_patches():
    from vlm_course.data.synthetic import Shape

    square = Shape("square", "blue", cx=20.0, cy=20.0, size=16.0)  # covers pixels 12..28: patches 1-3 x 1-3
    colour, shape = pretrain_vit.patch_labels([square], image_size=64, patch=8, min_cover=16)
    grid_colour = colour.reshape(8, 8)
    assert grid_colour[2, 2] == 1 + pretrain_vit.COLOURS.index("blue")
    assert shape.reshape(8, 8)[2, 2] == 1 + pretrain_vit.SHAPES.index("square")
    assert grid_colour[6, 6] == 0 and grid_colour[0, 7] == 0  # background far away


def test_pretrain_and_save_round_trip(tmp_path):
    vision_cfg = get_profile("tiny").config.vision
    cfg = pretrain_vit.PretrainConfig(steps=2, batch_size=8, num_images=16, warmup_steps=1)
    encoder, result = pretrain_vit.pretrain(cfg, vision_cfg)
    assert len(result["loss_history"]) == 2
    folder = pretrain_vit.save_siglip(encoder, tmp_path / "vit")
    loaded = VisionEncoder.from_siglip(folder)
    x = torch.randn(1, 3, vision_cfg.image_size, vision_cfg.image_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))


# ----------------------------------------------------------------------------------------------
# The demo's training pieces, on the tiny profile


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionLanguageModel.from_profile("tiny")
    processor = VLMProcessor.from_config(model.config, system_prompt=None)
    return model, processor


def _samples(n=4):
    return demo.load_samples("test", ["count", "mc"], n // 2)


def test_train_config_is_the_recipe_for_the_library_trainer():
    """A stage trains what has a learning rate above 0; the rest of the recipe maps one to one."""
    recipe = demo.DemoRecipe()
    qa = recipe.stages[1]
    cfg = demo.train_config(recipe, qa, "out")
    assert (cfg.vision, cfg.projector, cfg.decoder) == ("frozen", "frozen", "qlora")
    assert (cfg.lr_lora, cfg.max_steps, cfg.batch_size, cfg.lora_r, cfg.lora_alpha) == (1e-3, qa.steps, 16, 16, 32)
    assert math.ceil(cfg.warmup_fraction * cfg.max_steps) == qa.warmup_steps  # the Trainer's warmup, in steps
    assert cfg.group_by_length and cfg.frozen_dtype == "compute" and cfg.adam_betas == (0.9, 0.95)
    both = demo.Stage("s", steps=10, lr_projector=1e-3, lr_vision=1e-4, lr_lora=0.0, warmup_steps=1)
    cfg = demo.train_config(recipe, both)
    assert (cfg.vision, cfg.projector, cfg.lr_projector, cfg.lr_vision) == ("full", "full", 1e-3, 1e-4)


def test_retired_stage_kinds_are_refused():
    with pytest.raises(ValueError, match="retired"):
        demo.Stage("captions", steps=10, lr_projector=1e-3, lr_vision=0.0, lr_lora=0.0, warmup_steps=1,
                   data="captions")


def test_demo_model_gets_the_librarys_qlora():
    """build_model sets QLoRA up with vlm_course.training's apply_recipe: 4-bit blocks, LoRA only trainable, the
    tied head kept, frozen embeddings in the compute dtype."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    model, _ = demo.build_model("tiny", demo.replace(demo.DemoRecipe(), precision="bf16"))
    q_proj = model.decoder.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.compute_dtype == torch.bfloat16
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert model.decoder.rotary.inv_freq.dtype == torch.float32
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.decoder.named_parameters())
    with demo.compute_autocast(model):
        assert torch.is_autocast_enabled("cpu")


def test_demo_trains_with_the_library_trainer(tmp_path):
    """The QA stage is a vlm_course.training.Trainer run: its checkpoint is in out/train/<stage>, the LoRA
    adapters change, and a second run starts afresh there (not a resume of the first, not an error)."""
    torch.manual_seed(0)
    recipe = demo.quick_recipe(demo.DemoRecipe())
    model, processor = demo.build_model("tiny", recipe)
    samples = demo.load_samples("test", ["count", "mc"], 8)
    lora_before = [p.detach().clone() for p in demo.lora_parameters(model)]
    history = demo.train(model, processor, samples, recipe, tmp_path, progress=False)
    assert [h["stage"] for h in history] == ["words", "qlora", "qlora", "qlora"]
    assert (tmp_path / "train" / "qlora" / "checkpoint-000003").is_dir()
    assert any(not torch.equal(a, b) for a, b in zip(lora_before, demo.lora_parameters(model)))
    demo.train(model, processor, samples, replace_stages(recipe, 2), tmp_path, progress=False)  # no FileExistsError
    assert (tmp_path / "train" / "qlora" / "checkpoint-000002").is_dir()
    assert not (tmp_path / "train" / "qlora" / "checkpoint-000003").exists()


def replace_stages(recipe, steps):
    return demo.replace(recipe, stages=tuple(demo.replace(s, steps=steps) if s.fit == "gradient" else s
                                             for s in recipe.stages))


def test_demo_evaluation_is_the_librarys_loop(tiny):
    """demo.evaluate scores with vlm_course.evaluation: the same per-subset figures as evaluating the rows."""
    from vlm_course.evaluation import evaluate as evaluate_rows

    model, processor = tiny
    samples = _samples(8)
    accuracy, records = demo.evaluate(model, processor, samples, batch_size=4, max_new_tokens=2, progress=False)
    direct = evaluate_rows(model, processor, demo.as_rows(samples), batch_size=4, max_new_tokens=2, progress=False)
    assert accuracy == direct.by_subset
    assert [r["prediction"] for r in records] == [r.prediction for r in direct.records]


def test_quick_demo_runs_end_to_end(tmp_path, capsys):
    result = demo.run_demo("tiny", demo.quick_recipe(demo.DemoRecipe()), tmp_path, progress=False)
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line.startswith("demo: shapes ") and "| train " in last_line and "cores" in last_line
    assert set(result["after"]) == set(demo.EVAL_SUBSETS)
    for name in ("loss_curve.png", "before_after.png", "samples.png", "results.json"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "checkpoint" / "trainable.safetensors").exists()
    recipe = demo.quick_recipe(demo.DemoRecipe())
    solved = sum(stage.fit == "least_squares" for stage in recipe.stages)  # one history record each
    assert len(result["history"]) == recipe.total_steps + solved
    # Both figures per subset, and chance beside them, in the one-line summary.
    for subset in demo.EVAL_SUBSETS:
        assert f"{subset} " in last_line and "other image" in last_line and "chance" in last_line
    assert set(result["other_image"]) == set(demo.EVAL_SUBSETS)


# ----------------------------------------------------------------------------------------------
# The demo's image side: 3 x 3 blocks, two word-like tokens each, their place written in words


def test_block_objects_name_the_block_of_each_centre_and_prefer_the_larger():
    from vlm_course.data.synthetic import Shape
    from vlm_course.pretrain_blocks import block_labels, block_objects

    small = Shape("circle", "red", cx=5, cy=5, size=10)
    large = Shape("square", "blue", cx=15, cy=15, size=12)  # same top-left block (0-21.3 px), larger
    right = Shape("triangle", "green", cx=60, cy=32, size=12)  # middle row, right column
    objects = block_objects([small, large, right], side=3)
    assert objects[0] is large and objects[5] is right
    assert sum(o is not None for o in objects) == 2
    colour, shape = block_labels([right], side=3)
    assert colour.tolist() == [0, 0, 0, 0, 0, 1 + synthetic.COLOURS.index("green"), 0, 0, 0]
    assert shape[5] == 1 + synthetic.SHAPES.index("triangle")
    assert demo.block_words([right], side=3)[10:12] == [" green", " triangle"]
    assert demo.block_words([right], side=3)[:2] == [" no", " object"]


def test_least_squares_projector_recovers_a_linear_map():
    """If the words are an exact linear function of the block vectors, the closed-form fit finds it (error ~0)."""
    torch.manual_seed(0)
    recipe = demo.DemoRecipe()
    model = demo.with_image_layout(VisionLanguageModel.from_profile("tiny"), recipe)
    model.eval()
    pixels = torch.randn(64, 3, recipe.image_size, recipe.image_size)
    from vlm_course.projector import pixel_shuffle

    with torch.no_grad():
        blocks = pixel_shuffle(model.vision(pixels), recipe.shuffle_factor)  # (64, 9, D*9)
        # A target table whose rows are exact linear images of the block vectors: pick "word ids" = rows of a
        # small embedding table built from a random linear map, so the map is recoverable.
    width = model.config.decoder.hidden_size
    true = torch.randn(blocks.shape[-1], 2 * width) * 0.01
    targets = (blocks @ true).reshape(64, -1, width)
    vocab = targets.reshape(-1, width)
    model.decoder.embed_tokens = torch.nn.Embedding.from_pretrained(vocab)
    data = {"pixel_values": pixels, "word_ids": torch.arange(len(vocab)).reshape(64, -1)}
    error = demo.fit_projector_to_words(model, data, ridge=1e-6)
    assert error < 1e-3, f"relative squared error {error}"
    with torch.no_grad():
        torch.testing.assert_close(model.projector.block_tokens(model.vision(pixels)), targets, atol=1e-3, rtol=1e-2)


def test_other_images_roll_within_each_subset():
    samples = [{"subset": s, "image": f"{s}{i}", "question": f"q{i}", "answer": "a"}
               for s in ("shapes", "count") for i in range(3)]
    rolled = demo.with_other_images(samples)
    assert [r["question"] for r in rolled] == [s["question"] for s in samples]
    assert [r["image"] for r in rolled] == ["shapes1", "shapes2", "shapes0", "count1", "count2", "count0"]
    assert all(r["image"] != s["image"] for r, s in zip(rolled, samples))
    # Two questions about one scene (a two-turn row) never get each other's image: that would be the same scene.
    scene = object()
    pair = [{"subset": "shapes", "image": scene, "question": "a", "answer": "x"},
            {"subset": "shapes", "image": scene, "question": "b", "answer": "y"},
            {"subset": "shapes", "image": "other", "question": "c", "answer": "z"}]
    assert [r["image"] for r in demo.with_other_images(pair)] == ["other", "other", scene]


def test_vision_resized_to_its_own_size_is_the_same_function():
    from vlm_course.vision import VisionEncoder

    torch.manual_seed(0)
    encoder = VisionEncoder.from_siglip("course-vit-smol").eval()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(encoder.resized(64)(pixels), encoder(pixels), atol=1e-5, rtol=1e-5)
        bigger = encoder.resized(72)
        assert bigger.cfg.grid_size == 9 and bigger(torch.randn(1, 3, 72, 72)).shape == (1, 81, encoder.cfg.hidden_size)


# ----------------------------------------------------------------------------------------------
# The committed trained model (assets/demo_checkpoint): real SmolLM2 (offline GGUF), held-out questions


def test_committed_demo_checkpoint_answers_from_the_picture():
    """The checkpoint `make demo` trained, as committed: right on held-out colour/shape, count and position
    questions, and at chance on the same questions with another scene's image (so the answers were read from the
    picture)."""
    from vlm_course.demo_panel import load_demo_checkpoint
    from vlm_course.vlm import answer

    folder = assets_dir() / "demo_checkpoint"
    results = json.loads((folder / "results.json").read_text())
    for subset, target in (("shapes", 0.90), ("count", 0.80), ("position", 0.85)):  # the demo's targets
        assert results["after"][subset] >= target, (subset, results["after"][subset])
        assert abs(results["other_image"][subset] - demo.CHANCE[subset]) <= 0.10, (subset, results["other_image"])
    model, processor = load_demo_checkpoint(folder)
    samples = demo.load_samples("test", ("shapes", "count", "position"), 16)
    questions = [s["question"] for s in samples]
    right = answer(model, processor, [s["image"] for s in samples], questions, max_new_tokens=4)
    other = answer(model, processor, [s["image"] for s in demo.with_other_images(samples)], questions,
                   max_new_tokens=4)
    gold = [s["answer"] for s in samples]
    right_acc = sum(p == g for p, g in zip(right, gold)) / len(gold)
    other_acc = sum(p == g for p, g in zip(other, gold)) / len(gold)
    assert right_acc >= 0.7, f"held-out accuracy {right_acc:.2f}: {list(zip(questions, right, gold))[:6]}"
    assert other_acc <= 0.35, f"with another scene's image still {other_acc:.2f}: the answers ignore the picture"


def test_each_counting_question_names_its_count_token():
    """Every phrasing the mini-cauldron uses maps to the label whose tally answers it."""
    for template in synthetic.COUNT_QUESTIONS["shape"]:
        for shape in synthetic.SHAPES:
            assert demo.count_label_of(template.format(shape=shape)) == f"{shape}s"
    for template in synthetic.COUNT_QUESTIONS["colour"]:
        for colour in synthetic.COLOURS:
            assert demo.count_label_of(template.format(colour=colour)) == colour
    for question in synthetic.COUNT_QUESTIONS["total"]:
        assert demo.count_label_of(question) == "objects"
