"""Saving the course model as a transformers Idefics3 (SmolVLM-architecture) checkpoint, and reading it back.

Parity is checked with the prompt built by transformers' own processor (AutoProcessor from the saved folder):
its input ids must equal the course processor's (image_layout="idefics3"), and Idefics3ForConditionalGeneration's
fp32 logits must equal ours within LOGIT_ATOL, with the same greedy answer.
"""

import dataclasses

import pytest
import torch
from PIL import Image, ImageDraw

from vlm_course.config import get_profile
from vlm_course.processing import VLMProcessor
from vlm_course.vlm import VisionLanguageModel, idefics3_name_map

# Both sides run the same fp32 operations on the same weights, but in different kernels (our attention and RMSNorm
# against transformers' sdpa and its own norms), so sums are reduced in other orders: each op differs in the last
# bits (~1e-7 relative), which grows through the layers. Logits of the tiny random models are O(1), SmolLM2's O(10):
# 1e-4 absolute is ~1e-5 relative at SmolLM2's scale, far above rounding and far below any real mismatch (a
# wrong or missing tensor, a shifted position, a different normalisation all move logits by >1e-2).
LOGIT_ATOL = 1e-4
QUESTION = "What colour is the shape?"


def picture(size=64, colour="red"):
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=colour)
    return image


def course_model(tied: bool, seed: int = 0):
    """A tiny random course model in Idefics3's layout, its table grown to the processor's tokenizer."""
    config = get_profile("tiny").config
    config.image_layout = "idefics3"
    config.decoder = dataclasses.replace(config.decoder, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    model = VisionLanguageModel(config)
    processor = VLMProcessor.from_config(model.config)
    rows = config.decoder.vocab_size
    model.resize_vocabulary(len(processor.tokenizer))
    with torch.no_grad():  # the grown rows are means; make them distinct so a misplaced row would show
        model.decoder.embed_tokens.weight[rows:].normal_(0, 0.02)
        if not tied:
            model.decoder.lm_head.weight.normal_(0, 0.02)  # an untied head that differs from the embeddings
    return model.eval(), processor


def transformers_side(folder):
    from transformers import AutoProcessor, Idefics3ForConditionalGeneration

    model, info = Idefics3ForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval(), AutoProcessor.from_pretrained(folder)


def transformers_inputs(hf_processor, image, question=QUESTION):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    return hf_processor(text=text, images=[image], return_tensors="pt")


def check_parity(model, processor, folder, images, question=QUESTION):
    """Logits and greedy answers of the saved checkpoint in transformers equal ours; returns the max difference."""
    model.save_idefics3(folder, processor)
    hf_model, hf_processor = transformers_side(folder)
    assert type(hf_processor).__name__ == "Idefics3Processor"
    worst = 0.0
    for image in images:
        hf_batch = transformers_inputs(hf_processor, image, question)
        ours = processor([image], [question])
        assert hf_batch["input_ids"].tolist() == ours["input_ids"].tolist(), "the prompts differ"
        torch.testing.assert_close(hf_batch["pixel_values"][:, 0], ours["pixel_values"], atol=1e-6, rtol=0)
        with torch.no_grad():
            theirs = hf_model(**hf_batch).logits
            mine = model(ours["input_ids"], hf_batch["pixel_values"].flatten(0, 1)).logits
        assert theirs.shape == mine.shape
        worst = max(worst, float((theirs - mine).abs().max()))
        torch.testing.assert_close(mine, theirs, atol=LOGIT_ATOL, rtol=0)
        hf_new = hf_model.generate(**hf_batch, max_new_tokens=8, do_sample=False)[0, hf_batch["input_ids"].shape[1]:]
        our_new = model.generate(ours["input_ids"], ours["pixel_values"], ours["attention_mask"], max_new_tokens=8,
                                 eos_token_id=processor.eos_token_id)[0]
        hf_new, our_new = hf_new.tolist(), our_new.tolist()
        # transformers pads a finished row; ours stops at <|im_end|>: compare up to and including it
        if processor.eos_token_id in hf_new:
            hf_new = hf_new[:hf_new.index(processor.eos_token_id) + 1]
        assert hf_new == our_new, (processor.decode(hf_new), processor.decode(our_new))
    print(f"max |logit difference| {worst:.2e}")
    return worst


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_parity_with_transformers(tmp_path, tied):
    model, processor = course_model(tied)
    worst = check_parity(model, processor, tmp_path / "idefics3", [picture(64, "red"), picture(128, "blue")])
    assert worst < LOGIT_ATOL
    # The untied head is saved as lm_head.weight; a tied one is not (transformers ties it to the embeddings).
    from safetensors import safe_open

    with safe_open(tmp_path / "idefics3" / "model.safetensors", framework="pt") as f:
        assert ("lm_head.weight" in f.keys()) == (not tied)
        assert set(f.keys()) == set(idefics3_name_map(model.config).values())


def test_smol_parity_with_transformers(tmp_path):
    """The `smol` profile model (the course ViT + the real SmolLM2-135M-Instruct) in Idefics3's layout."""
    model = VisionLanguageModel.from_profile("smol")
    model.config.image_layout = "idefics3"
    processor = VLMProcessor.from_config(model.config)
    model.resize_vocabulary(len(processor.tokenizer)).eval()
    worst = check_parity(model, processor, tmp_path / "idefics3", [picture(64, "green")])
    assert worst < LOGIT_ATOL


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_gives_the_same_model(tmp_path, tied):
    model, processor = course_model(tied, seed=1)
    again = VisionLanguageModel.from_idefics3(model.save_idefics3(tmp_path / "idefics3", processor))
    ours, theirs = model.state_dict(), again.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name
    for part in ("vision", "projector", "decoder"):
        assert getattr(again.config, part) == getattr(model.config, part), part
    assert again.config.image_layout == "idefics3"
    assert (again.decoder.lm_head.weight is again.decoder.embed_tokens.weight) == tied
    # the saved tokenizer gives the same prompt ids
    image = picture(64)
    assert torch.equal(VLMProcessor.from_config(again.config)([image], [QUESTION])["input_ids"],
                       processor([image], [QUESTION])["input_ids"])


def test_idefics3_markers_are_single_tokens(tmp_path):
    """Each marker of the layout is one token of the saved tokenizer, as in SmolVLM's (llama.cpp's multimodal tool
    looks <fake_token_around_image> and <global-img> up as single tokens), and the prompt holds each where
    Idefics3 puts it."""
    model, processor = course_model(tied=True)
    _, hf_processor = transformers_side(model.save_idefics3(tmp_path / "idefics3", processor))
    ids = transformers_inputs(hf_processor, picture(64))["input_ids"][0].tolist()
    fake, image, global_img = hf_processor.tokenizer.convert_tokens_to_ids(
        ["<fake_token_around_image>", "<image>", "<global-img>"])
    n = model.config.image_tokens_per_image
    start = ids.index(fake)
    assert ids[start:start + n + 3] == [fake, global_img] + [image] * n + [fake]
    assert ids == processor([picture(64)], [QUESTION])["input_ids"][0].tolist()
    assert max(ids) < model.config.decoder.vocab_size


def test_demo_model_is_refused_with_every_reason():
    """The demo's model (tiny profile, its recipe): every feature Idefics3 cannot express is named, with the fix."""
    from vlm_course import demo

    model, processor = demo.build_model("tiny", demo.DemoRecipe(vision_weights=None))
    with pytest.raises(ValueError) as err:
        model.save_idefics3("/nonexistent/never-written", processor)
    message = str(err.value)
    for reason in ("2 tokens per pixel-shuffled block", "tokens_per_block=1", "count tokens", "count_labels=()",
                   "projector bias", "bias=False", "block-place words", "image_layout='idefics3'", "LoRA adapters",
                   "merge_lora_adapters"):
        assert reason in message, reason


def test_other_refusals(tmp_path):
    config = get_profile("tiny").config  # the plain layout, and a table without the Idefics3 tokens
    model = VisionLanguageModel(config)
    with pytest.raises(ValueError, match=r"image_layout='plain'.*\(2\) the tokenizer has 49153 tokens but the "
                                         r"decoder's table 49152 rows.*resize_vocabulary"):
        model.save_idefics3(tmp_path / "x")
    assert not (tmp_path / "x").exists()
    model, processor = course_model(tied=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="other things"):
        model.save_idefics3(tmp_path / "notes", processor)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    assert model.save_idefics3(tmp_path / "again", processor) == model.save_idefics3(tmp_path / "again", processor)


def test_idefics3_layout_needs_the_table_to_hold_its_tokens():
    config = get_profile("tiny").config
    config.image_layout = "idefics3"
    model = VisionLanguageModel(config)
    processor = VLMProcessor.from_config(model.config)
    batch = processor([picture(64)], [QUESTION])
    with pytest.raises(ValueError, match="resize_vocabulary"):
        model(**batch)
    model.resize_vocabulary(len(processor.tokenizer))
    assert model(**batch).logits.shape[-1] == len(processor.tokenizer)
    with pytest.raises(ValueError, match="tokens_per_block=1"):
        dataclasses.replace(config, projector=dataclasses.replace(config.projector, tokens_per_block=2))


def test_demo_trained_in_idefics3s_layout_saves_as_idefics3(tmp_path):
    """`python -m vlm_course demo --layout idefics3` (here: the tiny profile, quick) trains a model save_idefics3 can
    write: its checkpoint, merged and saved by `save_as_idefics3`, loads in transformers with the same logits and
    greedy answers as the course model it came from. A grid-layout demo checkpoint is refused with the reasons."""
    from vlm_course import demo
    from vlm_course.deploy.merge import merge_lora_adapters

    recipe = demo.quick_recipe(demo.idefics3_recipe())
    demo.run_demo("tiny", recipe, tmp_path / "run", progress=False)
    checkpoint = tmp_path / "run" / "checkpoint"
    folder = demo.save_as_idefics3(checkpoint, tmp_path / "idefics3", profile="tiny")
    model, processor = demo.load_checkpoint(checkpoint, "tiny")
    assert model.config.image_layout == "idefics3" and model.config.projector.tokens_per_block == 1
    model = merge_lora_adapters(model).float().eval()
    assert check_parity(model, processor, folder, [picture(64, "red"), picture(64, "blue")]) < LOGIT_ATOL

    demo.run_demo("tiny", demo.quick_recipe(demo.DemoRecipe(vision_weights=None)), tmp_path / "grid", progress=False)
    with pytest.raises(ValueError, match=r"not trained with Idefics3's image side.*--layout idefics3"):
        demo.save_as_idefics3(tmp_path / "grid" / "checkpoint", tmp_path / "nope", profile="tiny")
    assert not (tmp_path / "nope").exists()


def test_committed_idefics3_demo_checkpoint_has_transformers_parity(tmp_path):
    """The trained model (assets/demo_checkpoint_idefics3: `python -m vlm_course demo --layout idefics3`), merged and
    saved: transformers' Idefics3ForConditionalGeneration, fed by its own processor, gives our logits and greedy
    answers on held-out pictures, and the model is a trained one (it names the colour it is asked about)."""
    from vlm_course import demo
    from vlm_course.deploy.merge import merge_lora_adapters
    from vlm_course.weights import assets_dir

    checkpoint = assets_dir() / "demo_checkpoint_idefics3"
    folder = demo.save_as_idefics3(checkpoint, tmp_path / "idefics3")
    model, processor = demo.load_checkpoint(checkpoint)
    model = merge_lora_adapters(model).float().eval()
    samples = demo.load_samples("test", ("shapes",), 40)[:40]
    for sample in samples[:2]:
        assert check_parity(model, processor, folder, [sample["image"]], sample["question"]) < LOGIT_ATOL
    from vlm_course.vlm import answer

    said = answer(model, processor, [s["image"] for s in samples], [s["question"] for s in samples], max_new_tokens=4)
    right = sum(a == s["answer"] for a, s in zip(said, samples)) / len(samples)
    assert right >= 0.45, f"{right:.2f} of 40 held-out shapes questions (chance 0.20, make demo measured 0.62)"


def test_cross_attention_and_a_second_branch_are_refused_by_name(tmp_path):
    """A lesson 08 cross-attention model and a lesson 09 two-branch model: each refusal names the feature and what to
    train instead, not only the tensors that have no place (nor a guess at 4-bit layers)."""
    from vlm_course.config import FusionConfig, HighResConfig
    from vlm_course.dual_vision import add_high_res_branch

    config = get_profile("tiny").config
    config.image_layout = "idefics3"
    config.fusion = FusionConfig(kind="cross_attention", cross_attention_every=1)
    model = VisionLanguageModel(config)
    problems = model.idefics3_problems()
    assert any("fusion kind 'cross_attention'" in p and "fusion.kind='autoregressive'" in p for p in problems), problems
    assert not any("no place for (" in p for p in problems), problems  # the fusion's tensors are explained

    config = get_profile("tiny").config  # the plain layout: the only one a second branch takes
    high_res = HighResConfig(vision=dataclasses.replace(config.vision, image_size=128), shuffle_factor=4)
    model = add_high_res_branch(VisionLanguageModel(config), high_res)
    problems = model.idefics3_problems()
    assert any("second, high-resolution vision branch" in p and "high_res=None" in p for p in problems), problems
    assert not any("no place for (" in p for p in problems), problems
    with pytest.raises(ValueError, match="high-resolution"):
        model.save_idefics3(tmp_path / "never")
    assert not (tmp_path / "never").exists()
