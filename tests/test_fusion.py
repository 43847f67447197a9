"""Fusion: fully autoregressive (today's model) vs Flamingo's gated cross-attention blocks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_course.config import DecoderConfig, FusionConfig, get_profile
from vlm_course.fusion import (
    GatedCrossAttentionBlock,
    GatedCrossAttentionFusion,
    decoder_flops_per_token,
    fusion_cost,
)
from vlm_course.processing import VLMProcessor
from vlm_course.training import TrainConfig, Trainer
from vlm_course.vlm import VisionLanguageModel

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def cross_config(every=1, layers=2):
    config = get_profile("tiny").config
    config.fusion = FusionConfig(kind="cross_attention", cross_attention_every=every)
    config.decoder.num_layers = layers
    return config


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(cross_config(), system_prompt=None)


def model_and_processor(processor, every=1, layers=2, seed=0):
    torch.manual_seed(seed)
    model = VisionLanguageModel(cross_config(every, layers))
    model.config.image_token_id = processor.image_token_id
    return model.eval()


def image(rgb):
    return Image.new("RGB", (64, 64), rgb)


def open_gates(model, value=0.7):
    with torch.no_grad():
        for block in model.fusion.blocks.values():
            block.attn_gate.fill_(value)
            block.mlp_gate.fill_(value)


def test_one_marker_per_image_in_the_text(processor):
    assert processor.tokens_per_image == 1
    batch = processor([image(COLOURS["red"])], ["What colour?"])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 1


def test_blocks_go_before_every_nth_layer():
    decoder = DecoderConfig(num_layers=5, hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2,
                            vocab_size=100)
    fusion = GatedCrossAttentionFusion(FusionConfig("cross_attention", cross_attention_every=2), decoder)
    assert fusion.positions == [1, 3] and sorted(fusion.blocks) == ["1", "3"]
    assert fusion.block_before(0) is None and fusion.block_before(3) is fusion.blocks["3"]
    with pytest.raises(ValueError, match="no block would be inserted"):
        GatedCrossAttentionFusion(FusionConfig("cross_attention", cross_attention_every=9), decoder)


def test_with_gates_at_zero_the_model_is_the_language_model_exactly(processor):
    """tanh(0) = 0: on text, the logits are the decoder's own, bit for bit; with an image, the image changes nothing
    (the only trace of it is the marker token, whose embedding does not depend on the image)."""
    model = model_and_processor(processor)
    text = processor([[]], ["Say something about colours."])
    with torch.no_grad():
        ours = model(text["input_ids"], None, text["attention_mask"]).logits
        lm = model.decoder(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).logits
        assert torch.equal(ours, lm)
        red = processor([image(COLOURS["red"])], ["What colour?"])
        blue = processor([image(COLOURS["blue"])], ["What colour?"])
        with_red = model(red["input_ids"], red["pixel_values"], red["attention_mask"]).logits
        with_blue = model(blue["input_ids"], blue["pixel_values"], blue["attention_mask"]).logits
        assert torch.equal(with_red, with_blue)
        embeds, _ = model.prepare(red["input_ids"], red["pixel_values"])
        assert torch.equal(with_red, model.decoder(inputs_embeds=embeds, attention_mask=red["attention_mask"]).logits)


def test_a_gated_block_at_zero_is_the_identity_and_open_it_is_not():
    block = GatedCrossAttentionBlock(16, 4)
    x, images = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    assert torch.equal(block(x, images), x)
    with torch.no_grad():
        block.attn_gate.fill_(0.5)
    assert not torch.allclose(block(x, images), x)


def test_text_before_the_image_does_not_see_it(processor):
    model = model_and_processor(processor)
    open_gates(model)
    red = processor([image(COLOURS["red"])], ["What colour?"])
    blue = processor([image(COLOURS["blue"])], ["What colour?"])
    marker = int((red["input_ids"][0] == processor.image_token_id).nonzero()[0])
    with torch.no_grad():
        a = model(red["input_ids"], red["pixel_values"]).logits
        b = model(blue["input_ids"], blue["pixel_values"]).logits
    assert marker > 2
    assert torch.equal(a[:, :marker], b[:, :marker])  # the system/user header comes before the image
    assert not torch.allclose(a[:, marker:], b[:, marker:])


def test_each_row_reads_its_own_image_in_a_batch(processor):
    """A batch of two rows gives each row the logits it gets alone (right-padded, the other row's image unseen);
    a row without an image gets no cross-attention."""
    model = model_and_processor(processor)
    open_gates(model)
    questions = ["What colour?", "Which colour is this picture, please?"]
    pictures = [image(COLOURS["red"]), image(COLOURS["green"])]
    batch = processor(pictures, questions, padding_side="right")
    with torch.no_grad():
        together = model(batch["input_ids"], batch["pixel_values"], batch["attention_mask"]).logits
        for row in range(2):
            alone = processor([pictures[row]], [questions[row]])
            logits = model(alone["input_ids"], alone["pixel_values"], alone["attention_mask"]).logits
            length = logits.shape[1]
            torch.testing.assert_close(together[row, :length], logits[0], atol=1e-5, rtol=1e-5)


def test_generation_with_the_kv_cache_equals_generation_without(processor):
    model = model_and_processor(processor)
    open_gates(model, 1.0)
    batch = processor([image(COLOURS["red"]), image(COLOURS["yellow"])], ["What colour?", "Colour of this image?"])
    args = (batch["input_ids"], batch["pixel_values"], batch["attention_mask"])
    cached = model.generate(*args, max_new_tokens=6, eos_token_id=None)
    uncached = model.generate(*args, max_new_tokens=6, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)


def colour_rows():
    return [{"images": [image(rgb)], "texts": [{"user": "What colour is the image?", "assistant": name,
                                                 "source": "test"}]} for name, rgb in COLOURS.items()]


@pytest.mark.parametrize("decoder_recipe", ["lora", "qlora"])
def test_training_opens_the_gates_and_the_image_starts_to_matter(processor, decoder_recipe, tmp_path):
    """The existing recipes train the new blocks with the projector (LoRA or QLoRA on the decoder): after a few steps
    the gates have moved off 0 and the answer's logits depend on the image."""
    model = model_and_processor(processor)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=4, precision="fp32", progress=False,
                      decoder=decoder_recipe, warmup_fraction=0.0)
    trainer = Trainer(model, processor, colour_rows(), cfg)
    assert trainer.trainable["fusion"] == sum(p.numel() for p in model.fusion.parameters())
    assert not any("lora_" in n for n, _ in model.fusion.named_parameters())  # LoRA stays on the decoder
    trainer.fit()
    gates = [float(b.attn_gate.detach()) for b in model.fusion.blocks.values()]
    assert all(g != 0.0 for g in gates), gates
    model.eval()
    red = processor([image(COLOURS["red"])], ["What colour is the image?"])
    blue = processor([image(COLOURS["blue"])], ["What colour is the image?"])
    with torch.no_grad():
        a = model(red["input_ids"], red["pixel_values"], red["attention_mask"]).logits[:, -1]
        b = model(blue["input_ids"], blue["pixel_values"], blue["attention_mask"]).logits[:, -1]
    assert (a - b).abs().max() > 1e-4


def test_a_saved_cross_attention_model_loads_with_its_blocks(processor, tmp_path):
    model = model_and_processor(processor)
    open_gates(model, 0.3)
    loaded = VisionLanguageModel.from_pretrained(model.save_pretrained(tmp_path / "model"))
    assert loaded.config.fusion.kind == "cross_attention"
    batch = processor([image(COLOURS["red"])], ["What colour?"])
    with torch.no_grad():
        assert torch.equal(loaded(batch["input_ids"], batch["pixel_values"]).logits,
                           model(batch["input_ids"], batch["pixel_values"]).logits)


def test_fusion_cost():
    config = get_profile("smol").config  # 16 image tokens, SmolLM2-135M's 30 layers
    per_token = decoder_flops_per_token(config.decoder)
    assert per_token == 2 * 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)  # ~ 2 x 106M
    auto = fusion_cost(config)
    assert auto == {"kind": "autoregressive", "decoder_tokens": 16, "flops": 16 * per_token}
    config.fusion = FusionConfig("cross_attention", cross_attention_every=5)  # 6 blocks
    cross = fusion_cost(config, text_tokens=32)
    d = 576
    block = 2 * 2 * 16 * d * d + 32 * (4 * d * d + 4 * 16 * d + 4 * d * 4 * d)
    assert cross == {"kind": "cross_attention", "decoder_tokens": 1, "flops": per_token + 6 * block}


def test_the_new_blocks_can_learn_at_their_own_rate(processor, tmp_path):
    """lr_fusion sets the cross-attention blocks' rate apart from the projector's (a fitted connector barely moving
    while blocks from random learn fast); None keeps them at the projector's, as before; a negative one is refused."""
    from vlm_course.training import apply_recipe, build_optimizer

    def lrs(**kw):
        model = model_and_processor(processor)
        cfg = TrainConfig(output_dir=str(tmp_path / "run"), progress=False, decoder="frozen", **kw)
        apply_recipe(model, cfg)
        groups = build_optimizer(model, cfg).param_groups
        return {g["name"].split("_")[0]: g["lr"] for g in groups}

    assert lrs(lr_projector=1e-4, lr_fusion=1e-3) == {"projector": 1e-4, "fusion": 1e-3}
    assert lrs(lr_projector=2e-3) == {"projector": 2e-3, "fusion": 2e-3}
    with pytest.raises(ValueError, match="lr_fusion must be a number >= 0"):
        TrainConfig(output_dir=str(tmp_path / "run"), lr_fusion=-1e-3)
