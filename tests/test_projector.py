"""Pixel shuffle and projector: parity with Idefics3's connector."""

import pytest
import torch
from transformers import Idefics3Config
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

from vlm_course.config import ProjectorConfig
from vlm_course.projector import ModalityProjector, pixel_shuffle


def idefics3_connector(dim, r, text_dim=24):
    cfg = Idefics3Config(vision_config=dict(hidden_size=dim, num_attention_heads=2),
                         text_config=dict(hidden_size=text_dim, num_attention_heads=4, num_key_value_heads=2),
                         scale_factor=r)
    return Idefics3Connector(cfg)


@pytest.mark.parametrize("grid,r", [(4, 2), (6, 2), (6, 3), (8, 4), (14, 2), (27, 3), (5, 1)])
def test_pixel_shuffle_matches_idefics3(grid, r):
    x = torch.randn(3, grid * grid, 10)
    expected = idefics3_connector(10, r).pixel_shuffle(x, r)
    got = pixel_shuffle(x, r)
    assert got.shape == (3, grid * grid // r**2, 10 * r * r)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)  # pure data movement: bit-exact


def test_pixel_shuffle_groups_spatial_neighbours():
    """Each output token holds exactly the r x r block it covers: not a stride-r sample of the grid."""
    grid, r = 4, 2
    ids = torch.arange(grid * grid, dtype=torch.float32).view(1, grid * grid, 1)  # patch index as its feature
    out = pixel_shuffle(ids, r)[0]
    assert sorted(out[0].tolist()) == [0, 1, 4, 5]  # top-left block
    assert sorted(out[1].tolist()) == [2, 3, 6, 7]  # top-right block
    assert sorted(out[3].tolist()) == [10, 11, 14, 15]


@pytest.mark.parametrize("tokens,r,message", [(15, 2, "square"), (36, 4, "divisible"), (49, 2, "divisible")])
def test_pixel_shuffle_bad_grid(tokens, r, message):
    with pytest.raises(ValueError, match=message):
        pixel_shuffle(torch.randn(1, tokens, 8), r)


def test_projector_matches_idefics3_connector():
    conn = idefics3_connector(10, 2, text_dim=24)
    ours = ModalityProjector(ProjectorConfig(shuffle_factor=2), 10, 24)
    ours.proj.weight.data.copy_(conn.modality_projection.proj.weight.data)
    x = torch.randn(2, 36, 10)
    torch.testing.assert_close(ours(x), conn(x), atol=1e-6, rtol=0)


def test_mlp_projector_shapes():
    proj = ModalityProjector(ProjectorConfig(shuffle_factor=2, kind="mlp"), 10, 24)
    assert proj(torch.randn(2, 16, 10)).shape == (2, 4, 24)


def test_tokens_per_block_puts_a_blocks_tokens_side_by_side():
    """k tokens per block: the linear's output k*D is cut into k consecutive tokens, blocks stay in order."""
    import torch

    from vlm_course.config import ProjectorConfig
    from vlm_course.projector import ModalityProjector, pixel_shuffle

    torch.manual_seed(0)
    one = ModalityProjector(ProjectorConfig(shuffle_factor=3), 8, 16)
    two = ModalityProjector(ProjectorConfig(shuffle_factor=3, tokens_per_block=2), 8, 16)
    patches = torch.randn(2, 81, 8)
    out = two(patches)
    assert out.shape == (2, 18, 16)
    full = two.proj(pixel_shuffle(patches, 3))  # (2, 9, 32)
    torch.testing.assert_close(out[:, 0::2], full[..., :16])
    torch.testing.assert_close(out[:, 1::2], full[..., 16:])
    assert one(patches).shape == (2, 9, 16)
