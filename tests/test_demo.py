"""Smoke tests for the offline demo and the course's small ViT (fast: tiny profile, a few steps)."""

import json

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


def test_captions_name_every_object_in_reading_order():
    from vlm_course.data.synthetic import Shape

    shapes = [Shape("circle", "red", 50.0, 55.0, 10.0), Shape("square", "blue", 10.0, 10.0, 10.0),
              Shape("triangle", "green", 32.0, 32.0, 10.0)]
    assert demo.caption(shapes, 64) == "3 objects: blue square top left, green triangle center, red circle bottom right."
    samples = demo.caption_samples(3, seed=0)
    assert [s["question"] for s in samples] == [demo.CAPTION_PROMPT] * 3
    assert all(s["answer"].split()[0].isdigit() and s["image"].size == (64, 64) for s in samples)
    assert [s["answer"] for s in samples] == [s["answer"] for s in demo.caption_samples(3, seed=0)]


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


def test_answer_loss_equals_the_full_loss(tiny):
    """Left padding + logits only at the answers gives the same loss as the model's own right-padded forward."""
    model, processor = tiny
    encoded = demo.encode_samples(processor, _samples())
    with torch.no_grad():
        fast = demo.answer_loss(model, demo.collate(processor, encoded, padding_side="left"))
        full = model(**demo.collate(processor, encoded, padding_side="right")).loss
    torch.testing.assert_close(fast, full, atol=1e-4, rtol=1e-4)


def test_batches_bucket_by_length_and_cover_an_epoch(tiny):
    _, processor = tiny
    encoded = demo.encode_samples(processor, demo.load_samples("test", ["count", "mc"], 16))
    batches = demo.Batches(processor, encoded, batch_size=4, seed=0)
    batches.new_epoch()
    epoch = [list(b) for b in batches.batches]
    seen = [i for b in epoch for i in b]
    assert len(seen) == len(set(seen)) == len(encoded)  # 32 samples, 8 batches of 4: each exactly once
    padded = sum(4 * max(len(encoded[i]["input_ids"]) for i in b) for b in epoch)
    assert padded < 1.1 * sum(len(e["input_ids"]) for e in encoded)  # mc and count rows are not mixed
    assert demo.Batches(processor, encoded, 4, seed=0).next()["input_ids"].shape[0] == 4


def test_qlora_gradients_reach_the_projector_after_an_evaluation():
    """bitsandbytes repacks 4-bit weights for fast CPU inference, and the repacked kernel has no backward;
    make_qlora must keep gradients flowing to the projector even after an eval pass."""
    torch.manual_seed(0)
    recipe = demo.quick_recipe(demo.DemoRecipe())
    model = VisionLanguageModel.from_profile("tiny")
    processor = VLMProcessor.from_config(model.config, system_prompt=None)
    demo.make_qlora(model, recipe)
    samples = _samples()
    demo.evaluate(model, processor, samples, batch_size=4, max_new_tokens=2, progress=False)
    model.train()
    batch = demo.collate(processor, demo.encode_samples(processor, samples))
    with demo.compute_autocast(model):
        loss = demo.answer_loss(model, batch)
    loss.backward()
    grad = model.projector.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    lora = demo.lora_parameters(model)
    assert lora and all(not p.requires_grad or p.grad is not None for p in lora)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_make_qlora_quantises_the_blocks_and_keeps_the_head_tied(precision, dtype):
    """bf16 compute only where asked (or, with "auto", where the CPU has native bf16: emulated bf16 is ~100x
    slower than fp32 on an AVX2-only CPU); the 4-bit layers, embeddings and autocast all follow that choice."""
    import bitsandbytes as bnb

    model = VisionLanguageModel.from_profile("tiny")
    demo.make_qlora(model, demo.DemoRecipe(precision=precision))
    q_proj = model.decoder.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q_proj, bnb.nn.Linear4bit) and q_proj.compute_dtype == dtype
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    assert model.decoder.embed_tokens.weight.dtype == dtype
    with demo.compute_autocast(model):
        assert torch.is_autocast_enabled("cpu") == (dtype == torch.bfloat16)
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert model.decoder.rotary.inv_freq.dtype == torch.float32
    assert all(p.requires_grad == ("lora_" in n) for n, p in model.decoder.named_parameters())


def test_make_optimizer_groups_by_module_not_by_name(tiny):
    """'proj' is in q_proj/o_proj too: groups must come from the modules, or LoRA gets the projector's lr."""
    model, _ = tiny
    import copy

    model = copy.deepcopy(model)
    demo.make_qlora(model, demo.DemoRecipe())
    stage = demo.Stage("s", steps=1, lr_projector=1e-3, lr_vision=0.0, lr_lora=1e-4, warmup_steps=1)
    optimizer = demo.make_optimizer(model, stage)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"projector", "lora"}
    assert {id(p) for p in groups["projector"]["params"]} == {id(p) for p in model.projector.parameters()}
    assert all(not p.requires_grad for p in model.vision.parameters())


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
    """The checkpoint `make demo` trained, as committed: right on held-out colour/shape and position questions,
    and at chance on the same questions with another scene's image (so the answers were read from the picture)."""
    from vlm_course.demo_panel import load_demo_checkpoint
    from vlm_course.vlm import answer

    folder = assets_dir() / "demo_checkpoint"
    results = json.loads((folder / "results.json").read_text())
    assert results["after"]["shapes"] >= 0.9 and results["other_image"]["shapes"] <= 0.3
    model, processor = load_demo_checkpoint(folder)
    samples = demo.load_samples("test", ("shapes", "position"), 24)
    questions = [s["question"] for s in samples]
    right = answer(model, processor, [s["image"] for s in samples], questions, max_new_tokens=4)
    other = answer(model, processor, [s["image"] for s in demo.with_other_images(samples)], questions,
                   max_new_tokens=4)
    gold = [s["answer"] for s in samples]
    right_acc = sum(p == g for p, g in zip(right, gold)) / len(gold)
    other_acc = sum(p == g for p, g in zip(other, gold)) / len(gold)
    assert right_acc >= 0.75, f"held-out accuracy {right_acc:.2f}: {list(zip(questions, right, gold))[:6]}"
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
