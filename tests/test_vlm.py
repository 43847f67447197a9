"""The assembled VLM: splicing, answer-only loss, batched generation, save/load, SmolVLM (Idefics3) interop."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from vlm_course.config import get_profile
from vlm_course.processing import IGNORE_INDEX, VLMProcessor
from vlm_course.vlm import VisionLanguageModel, answer, splice_image_features


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = VisionLanguageModel.from_profile("tiny").eval()
    return model, VLMProcessor.from_config(model.config)


def img(color):
    return Image.new("RGB", (64, 64), color)


def test_splice_puts_each_image_in_its_block():
    embeds = torch.zeros(2, 7, 3)
    ids = torch.tensor([[5, 9, 9, 5, 5, 9, 9], [9, 9, 5, 5, 5, 5, 5]])
    features = torch.arange(3, dtype=torch.float32).view(3, 1, 1).expand(3, 2, 3)  # image i -> value i
    out = splice_image_features(embeds, ids, features, image_token_id=9)
    assert out[0, 1:3].eq(0).all() and out[0, 5:7].eq(1).all() and out[1, 0:2].eq(2).all()
    assert out[0, [0, 3, 4]].eq(0).all()
    with pytest.raises(ValueError, match="image tokens"):
        splice_image_features(embeds, ids, features[:2], image_token_id=9)


def test_image_count_mismatch_is_explained(tiny):
    model, processor = tiny
    batch = processor([img("red")], ["What colour?"])
    with pytest.raises(ValueError, match="image tokens"):
        model(batch["input_ids"], torch.cat([batch["pixel_values"]] * 2))
    with pytest.raises(ValueError, match="no images"):
        model(batch["input_ids"], None)


def test_loss_is_answer_only(tiny):
    model, processor = tiny
    batch = processor([img("red"), img("blue")], ["What colour?", "Which colour is it?"], ["red", "blue"])
    out = model(**batch)
    labels = batch["labels"]
    manual = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels[:, 1:].reshape(-1),
                             ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, manual)
    # Changing the question's tokens' labels would matter only if they were trained: they are not.
    assert (labels[batch["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()
    assert (labels != IGNORE_INDEX).sum() == 4  # "red", "blue" (one token each) + <|im_end|> twice


def test_image_changes_the_answer_logits(tiny):
    model, processor = tiny
    red = model(**processor([img("red")], ["What colour?"])).logits
    blue = model(**processor([img("blue")], ["What colour?"])).logits
    assert not torch.allclose(red[:, -1], blue[:, -1])


def test_batched_generation_equals_one_by_one(tiny):
    model, processor = tiny
    images = [img("red"), [img("blue"), img("green")], img("white")]
    questions = ["What colour?", "Compare the two pictures, please.", "Hi"]
    batch = processor(images, questions)
    together = model.generate(batch["input_ids"], batch["pixel_values"], batch["attention_mask"], max_new_tokens=6,
                              eos_token_id=None)
    for i in range(3):
        single = processor([images[i]], [questions[i]])
        alone = model.generate(single["input_ids"], single["pixel_values"], single["attention_mask"],
                               max_new_tokens=6, eos_token_id=None)
        assert torch.equal(together[i], alone[0]), f"row {i} depends on its batch neighbours (padding leak)"
    assert len(answer(model, processor, images, questions, max_new_tokens=4)) == 3


def test_save_and_load_roundtrip(tiny, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "ckpt")
    again = VisionLanguageModel.from_pretrained(tmp_path / "ckpt")
    batch = processor([img("red")], ["What colour?"], ["red"])
    torch.testing.assert_close(again(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "ckpt")  # overwriting an existing checkpoint also works
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert not list(tmp_path.glob(".ckpt*")), "no temporary folders left behind"


def test_load_errors_are_explained(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        VisionLanguageModel.from_pretrained(tmp_path)


def test_profiles():
    for name in ("tiny", "smol", "nano"):
        cfg = get_profile(name).config
        assert cfg.image_tokens_per_image == {"tiny": 16, "smol": 16, "nano": 49}[name]
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


@pytest.mark.parametrize("tied", [False, True])
def test_idefics3_interop_parity(tmp_path, tied):
    """A tiny random Idefics3 (SmolVLM's architecture) loads into our VLM and gives the same logits.

    tied=True: the checkpoint stores no lm_head (it is the embedding matrix); the loader must not call it missing.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration

    cfg = Idefics3Config(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=100, tie_word_embeddings=tied),
        scale_factor=2, image_token_id=99, tie_word_embeddings=tied,
    )
    ref = Idefics3ForConditionalGeneration(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = VisionLanguageModel.from_idefics3(tmp_path)
    ids = torch.randint(0, 98, (2, 14))
    ids[0, 1:5] = 99  # one image (16 patches / 2^2 = 4 tokens) per sample
    ids[1, 6:10] = 99
    pixels = torch.randn(2, 1, 3, 32, 32)
    with torch.no_grad():
        expected = ref(input_ids=ids, pixel_values=pixels).logits
        got = ours(ids, pixels.flatten(0, 1)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (ours.decoder.lm_head.weight is ours.decoder.embed_tokens.weight) == tied
