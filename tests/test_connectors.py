"""Connectors: linear / MLP after pixel shuffle (with and without it), the perceiver resampler, and their costs."""

from __future__ import annotations

import pytest
import torch

from vlm_course.config import ProjectorConfig, VisionConfig, VLMConfig, get_profile
from vlm_course.connectors import (
    LinearConnector,
    MLPConnector,
    PerceiverResampler,
    connector_cost,
    format_flops,
    perceiver_flops,
)
from vlm_course.projector import ModalityProjector, pixel_shuffle
from vlm_course.registry import build_connector


def test_the_linear_kind_is_todays_projector():
    torch.manual_seed(0)
    ours = build_connector(ProjectorConfig(shuffle_factor=2), 10, 24)
    torch.manual_seed(0)
    before = ModalityProjector(ProjectorConfig(shuffle_factor=2), 10, 24)
    assert isinstance(ours, LinearConnector) and isinstance(ours, ModalityProjector)
    x = torch.randn(2, 36, 10)
    assert torch.equal(ours(x), before(x))


def test_mlp_connector_is_the_old_mlp_projector_with_the_same_names():
    """A model saved with ModalityProjector(kind="mlp") loads into MLPConnector and gives the same tokens."""
    torch.manual_seed(0)
    ours = MLPConnector(ProjectorConfig(shuffle_factor=2, kind="mlp"), 10, 24)
    torch.manual_seed(0)
    before = ModalityProjector(ProjectorConfig(shuffle_factor=2, kind="mlp"), 10, 24)
    assert list(ours.state_dict()) == list(before.state_dict()) == ["proj.0.weight", "proj.0.bias", "proj.2.weight",
                                                                     "proj.2.bias"]
    x = torch.randn(3, 16, 10)
    assert torch.equal(ours(x), before(x))
    manual = ours.proj[2](torch.nn.functional.gelu(ours.proj[0](pixel_shuffle(x, 2))))
    torch.testing.assert_close(ours(x), manual, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
@pytest.mark.parametrize(("r", "tokens"), [(1, 36), (2, 9), (3, 4)])
def test_pixel_shuffle_connectors_with_and_without_shuffle(kind, r, tokens):
    cfg = ProjectorConfig(shuffle_factor=r, kind=kind, mlp_hidden_size=16)
    out = build_connector(cfg, 8, 12)(torch.randn(2, 36, 8))
    assert out.shape == (2, tokens, 12)
    config = VLMConfig(vision=VisionConfig(image_size=48, patch_size=8, hidden_size=8, intermediate_size=16,
                                           num_layers=1, num_heads=2), projector=cfg)
    assert config.connector_tokens_per_image == config.image_tokens_per_image == tokens


def test_the_demo_extras_stay_with_the_linear_kind():
    for kind in ("mlp", "perceiver"):
        with pytest.raises(ValueError, match="demo's extras of kind='linear'"):
            build_connector(ProjectorConfig(kind=kind, tokens_per_block=2, num_queries=4), 8, 12)
    with pytest.raises(ValueError, match="needs num_queries"):
        build_connector(ProjectorConfig(kind="perceiver"), 8, 12)
    with pytest.raises(ValueError, match="set num_queries=None"):
        build_connector(ProjectorConfig(kind="linear", num_queries=4), 8, 12)


def perceiver(num_queries=4, r=1, layers=2, heads=2, vision=6, width=8):
    cfg = ProjectorConfig(kind="perceiver", shuffle_factor=r, num_queries=num_queries, resampler_layers=layers,
                          resampler_heads=heads)
    return PerceiverResampler(cfg, vision, width).eval()


def test_perceiver_makes_a_fixed_number_of_tokens_whatever_the_patch_count():
    model = perceiver(num_queries=5)
    for patches in (16, 81, 729):
        assert model(torch.randn(2, patches, 6)).shape == (2, 5, 8)
    idefics2 = perceiver(num_queries=64, heads=4, vision=12, width=16, layers=1)
    assert idefics2(torch.randn(1, 729, 12)).shape == (1, 64, 16)  # Idefics2: 729 patches -> 64 tokens


def test_perceiver_reads_a_set_of_patches_and_each_image_alone():
    """No position enters the resampler: shuffling the patches changes nothing (position lives in the ViT's
    patch features); and each image of a batch is resampled on its own."""
    model = perceiver()
    x = torch.randn(3, 36, 6)
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x[:, torch.randperm(36)]), out, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(model(x[1:2]), out[1:2], atol=1e-6, rtol=1e-5)
        assert not torch.allclose(out[0], out[1])  # different images, different tokens


def test_perceiver_resampler_matches_transformers_idefics2():
    """Our resampler layers with Idefics2PerceiverResampler's weights (the same names) give its outputs
    (fp32, atol 1e-5: the two differ only in summation order inside the matmuls)."""
    from transformers.models.idefics2.configuration_idefics2 import Idefics2PerceiverConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2PerceiverResampler

    hf_cfg = Idefics2PerceiverConfig(hidden_act="silu", resampler_n_latents=6, resampler_depth=2, resampler_n_heads=2,
                                     resampler_head_dim=8, num_key_value_heads=2, attention_dropout=0.0)
    hf_cfg.hidden_size, hf_cfg.rms_norm_eps = 16, 1e-6
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    theirs = Idefics2PerceiverResampler(hf_cfg).eval()
    with torch.no_grad():
        for p in theirs.parameters():  # norms at 1 and latents at ones would hide a mix-up: randomise all
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0))
    ours = perceiver(num_queries=6, layers=2, heads=2, vision=16, width=16)
    missing, unexpected = ours.load_state_dict(theirs.state_dict(), strict=False)
    assert missing == ["input_proj.weight"] and unexpected == []
    context = torch.randn(3, 20, 16)
    with torch.no_grad():
        expected = theirs(context, attention_mask=torch.ones(3, 20, dtype=torch.long))
        torch.testing.assert_close(ours.resample(context), expected, atol=1e-5, rtol=1e-5)


def test_perceiver_trains():
    model = perceiver().train()
    model(torch.randn(2, 16, 6)).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_perceiver_flops_count_every_matmul():
    """The formula against a count of the multiply-adds of each nn.Linear and of attention, on a real forward."""
    model = perceiver(num_queries=4, r=2, layers=2, heads=2, vision=6, width=8)
    counted = []

    def count_linear(module, args, out):
        counted.append(2 * args[0].shape[:-1].numel() * module.in_features * module.out_features)

    hooks = [m.register_forward_hook(count_linear) for m in model.modules() if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        model(torch.randn(1, 64, 6))
    for h in hooks:
        h.remove()
    context = 64 // 4
    attention = 2 * (2 * 2 * 4 * (context + 4) * 8)  # two layers: scores and weighted sum, Q x (P + Q) x width
    assert perceiver_flops(context, 4, 8, 2, 6 * 4) == sum(counted) + attention
    assert PerceiverResampler.flops(model.cfg, 64, 6, 8) == sum(counted) + attention


def test_connector_cost_table_for_the_three_kinds():
    base = get_profile("smol").config  # 64 px, patch 8: 64 patches of 192
    costs = {}
    for name, projector in {"linear r=2": ProjectorConfig(shuffle_factor=2),
                            "linear r=1": ProjectorConfig(shuffle_factor=1),
                            "mlp r=2": ProjectorConfig(shuffle_factor=2, kind="mlp"),
                            "perceiver": ProjectorConfig(kind="perceiver", shuffle_factor=1, num_queries=8)}.items():
        costs[name] = connector_cost(VLMConfig(vision=base.vision, projector=projector, decoder=base.decoder))
    assert [c["tokens"] for c in costs.values()] == [16, 64, 16, 8]
    assert costs["linear r=2"]["flops"] == 2 * 16 * 192 * 4 * 576
    assert costs["linear r=1"]["flops"] == costs["linear r=2"]["flops"]  # the same multiply-adds, 4x the tokens
    assert costs["linear r=2"]["parameters"] == 192 * 4 * 576
    assert costs["mlp r=2"]["flops"] == 2 * 16 * (192 * 4 * 576 + 576 * 576)
    assert costs["perceiver"]["flops"] == perceiver_flops(64, 8, 576, 3, 192)
    assert format_flops(1.5e9) == "1.50 GFLOP" and format_flops(None) == "unknown"


def test_modality_projector_refuses_the_kinds_it_is_not():
    with pytest.raises(ValueError, match="build other kinds with vlm_course.registry.build_connector"):
        ModalityProjector(ProjectorConfig(kind="perceiver", num_queries=4), 8, 12)
