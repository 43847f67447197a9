"""Vision encoder: parity with transformers' SiglipVisionModel, loaded through our own name map."""

import pytest
import torch
from transformers import SiglipVisionConfig, SiglipVisionModel

from vlm_course.config import VisionConfig
from vlm_course.vision import VisionEncoder

# fp32, same operations in the same order: differences come only from kernel choice (SDPA vs eager
# matmul+softmax), so 1e-5 absolute is generous for activations of order 1 after the final LayerNorm.
ATOL = 1e-5


def tiny_siglip(tmp_path, image_size, patch_size, hidden=48, heads=3, layers=2):
    cfg = SiglipVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                             num_attention_heads=heads, image_size=image_size, patch_size=patch_size)
    ref = SiglipVisionModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("image_size,patch_size,heads", [(32, 8, 3), (48, 16, 4), (28, 14, 1), (40, 4, 6)])
def test_siglip_parity(tmp_path, image_size, patch_size, heads):
    ref = tiny_siglip(tmp_path, image_size, patch_size, hidden=48, heads=heads)
    ours = VisionEncoder.from_siglip(tmp_path)
    pixels = torch.randn(3, 3, image_size, image_size)
    with torch.no_grad():
        expected = ref(pixel_values=pixels).last_hidden_state
        got = ours(pixels)
    assert got.shape == (3, (image_size // patch_size) ** 2, 48)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_siglip_full_model_prefix(tmp_path):
    """A full SiglipModel checkpoint (text + vision, as google/siglip-base-patch16-224) loads by its vision_model."""
    from transformers import SiglipConfig, SiglipModel

    cfg = SiglipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99),
    )
    ref = SiglipModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    ours = VisionEncoder.from_siglip(tmp_path)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(pixels), ref.vision_model(pixel_values=pixels).last_hidden_state,
                                   atol=ATOL, rtol=0)


def test_conv_patch_embedding_equals_reshape_and_linear():
    """The lesson-01 fact the encoder relies on: a stride-p conv is a linear map on flattened patches."""
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                     num_layers=1, num_heads=2))
    pixels = torch.randn(2, 3, 32, 32)
    conv = enc.embeddings.patch_embedding
    patches = pixels.unfold(2, 8, 8).unfold(3, 8, 8)  # (B, C, 4, 4, 8, 8)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 16, 3 * 8 * 8)  # row-major patches, (c, y, x) inside
    linear = patches @ conv.weight.reshape(16, -1).T + conv.bias
    torch.testing.assert_close(conv(pixels).flatten(2).transpose(1, 2), linear, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,message", [
    ((2, 1, 32, 32), "channels"),
    ((2, 3, 4, 4), "smaller than one"),
    ((2, 3, 48, 32), "resize"),
    ((3, 32, 32), "batch, channels"),
])
def test_bad_pixel_values_are_explained(shape, message):
    enc = VisionEncoder(VisionConfig(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32,
                                     num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match=message):
        enc(torch.randn(*shape))


def test_wrong_checkpoint_is_refused(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    with pytest.raises(ValueError):
        VisionEncoder.from_siglip(tmp_path)
