"""The parts registry: kinds by name, today's model by default, and a connector added from this file alone."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn as nn
from PIL import Image
from safetensors import safe_open

from vlm_course import registry
from vlm_course.config import PROFILES, ProjectorConfig, VLMConfig, get_profile
from vlm_course.decoder import Decoder
from vlm_course.fusion import splice_image_features
from vlm_course.processing import VLMProcessor
from vlm_course.projector import ModalityProjector, pixel_shuffle
from vlm_course.training import TrainConfig, Trainer
from vlm_course.vision import VisionEncoder
from vlm_course.vlm import VisionLanguageModel, read_config_file
from vlm_course.weight_files import assets_dir

DEMO_CONFIG = assets_dir() / "demo_checkpoint" / "config.json"


def test_every_family_has_its_built_in_kinds():
    assert {"siglip"} <= set(registry.registered("vision"))
    assert {"linear", "mlp", "perceiver"} <= set(registry.registered("connector"))
    assert {"llama"} <= set(registry.registered("decoder"))
    assert {"autoregressive", "cross_attention"} <= set(registry.registered("fusion"))
    config = VLMConfig()
    assert (config.vision.kind, config.projector.kind, config.decoder.kind, config.fusion.kind) == (
        "siglip", "linear", "llama", "autoregressive")


def test_an_unknown_kind_names_the_registered_ones_and_how_to_add_one():
    config = get_profile("tiny").config
    config.projector.kind = "conv"
    with pytest.raises(ValueError, match=r"unknown connector kind 'conv' \(projector.kind.*'linear'.*"
                                         r"@register_connector\('conv'\)"):
        VisionLanguageModel(config)
    with pytest.raises(ValueError, match="unknown part family"):
        registry.registered("tokenizer")


def test_a_taken_name_is_refused_to_another_class_but_a_rerun_cell_replaces_itself():
    with pytest.raises(ValueError, match="'linear' is already registered"):
        registry.register_connector("linear")(type("Other", (nn.Module,), {}))
    first = registry.register_connector("test_rerun")(type("Rerun", (nn.Module,), {"__module__": "__main__"}))
    again = registry.register_connector("test_rerun")(type("Rerun", (nn.Module,), {"__module__": "__main__"}))
    try:
        assert registry.part_class("connector", "test_rerun") is again is not first
    finally:
        registry.unregister("connector", "test_rerun")


# ----------------------------------------------------------------------------------------------
# Today's model, unchanged: the committed configs build the same modules, names and outputs


def _configs():
    demo = read_config_file(DEMO_CONFIG)  # written before the kinds existed: no kind keys, no fusion section
    return {"demo_checkpoint": demo, **{name: p.config for name, p in PROFILES.items()}}


def _by_hand(config: VLMConfig) -> nn.Module:
    """The model as it was built before the registry: three classes, in this order."""
    parts = nn.Module()
    parts.vision = VisionEncoder(config.vision)
    parts.projector = ModalityProjector(config.projector, config.vision.hidden_size, config.decoder.hidden_size)
    parts.decoder = Decoder(config.decoder)
    return parts


def test_the_demo_checkpoint_config_reads_with_todays_kinds(tmp_path):
    """The demo's config as it was written before the kinds existed (no kind keys, no fusion section) reads as
    today's model."""
    saved = json.loads(DEMO_CONFIG.read_text())
    saved.pop("fusion", None)
    for part in ("vision", "decoder"):  # the projector always had its kind (linear or mlp)
        saved[part].pop("kind", None)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    config = read_config_file(tmp_path / "config.json")
    assert (config.vision.kind, config.projector.kind, config.decoder.kind, config.fusion.kind) == (
        "siglip", "linear", "llama", "autoregressive")
    assert config.image_tokens_per_image == 9 * 2 + 11  # 3 x 3 blocks of two tokens, eleven count tokens


@pytest.mark.parametrize("name", ["demo_checkpoint", "tiny", "smol", "nano"])
def test_committed_configs_build_the_same_parameters(name):
    config = _configs()[name]
    with torch.device("meta"):
        ours = {k: v.shape for k, v in VisionLanguageModel(config).state_dict().items()}
        before = {k: v.shape for k, v in _by_hand(config).state_dict().items()}
    assert ours == before


def test_the_demo_checkpoint_weights_all_have_their_place():
    """Every tensor of assets/demo_checkpoint/trainable.safetensors (projector and LoRA) names a parameter of the
    model its config builds (LoRA names: the base layer's, with the adapter inserted)."""
    config = read_config_file(DEMO_CONFIG)
    with torch.device("meta"):
        names = set(VisionLanguageModel(config).state_dict())
    with safe_open(DEMO_CONFIG.parent / "trainable.safetensors", framework="pt") as f:
        saved = list(f.keys())
    assert any(k.startswith("projector.") for k in saved)
    for key in saved:
        base = key.replace(".base_layer", "")
        if "lora_" in key:  # decoder.layers.0.self_attn.q_proj.lora_A.default.weight -> ...q_proj.weight
            base = base.split(".lora_")[0] + ".weight"
        assert base in names, key


def _small(config: VLMConfig) -> VLMConfig:
    """The same config with one vision and one decoder layer and a 512-word table: every kind and width as
    committed, but fast."""
    config = VLMConfig.from_dict(config.to_dict())
    config.vision = dataclasses.replace(config.vision, num_layers=1)
    config.decoder = dataclasses.replace(config.decoder, num_layers=1, vocab_size=512)
    config.image_token_id = config.decoder.vocab_size - 1  # a token id that lies in the table, as with a tokenizer
    return config


@pytest.mark.parametrize("name", ["demo_checkpoint", "tiny", "smol", "nano"])
def test_committed_configs_give_identical_logits(name):
    """Same seed, same inputs: the registry-built model's logits equal, bit for bit, those of the three parts built
    by hand and run as VisionLanguageModel ran them (splice at the <image> tokens, then the decoder)."""
    config = _small(_configs()[name])
    torch.manual_seed(0)
    ours = VisionLanguageModel(config).eval()
    torch.manual_seed(0)
    parts = _by_hand(config).eval()
    image_id, tokens = config.image_token_id, config.image_tokens_per_image
    ids = torch.tensor([[5, 6] + [image_id] * tokens + [7, 8, 9]])
    size = config.vision.image_size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = ours(ids, pixels).logits
        if config.projector.count_labels:  # the counter tallies words it gets from the embeddings: none set, all 0
            assert parts.projector.counter is not None
        features = parts.projector(parts.vision(pixels))
        embeds = splice_image_features(parts.decoder.embed_tokens(ids.masked_fill(ids == image_id, 0)), ids, features,
                                       image_id)
        expected = parts.decoder(inputs_embeds=embeds).logits
    assert torch.equal(logits, expected)


def test_a_model_saved_before_the_kinds_existed_loads_and_answers_the_same(tmp_path):
    torch.manual_seed(0)
    model = VisionLanguageModel(get_profile("tiny").config)
    model.config.image_token_id = 49152
    folder = model.save_pretrained(tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    for section in ("vision", "decoder"):
        data[section].pop("kind")
    for key in ("num_queries", "resampler_layers", "resampler_heads"):
        data["projector"].pop(key)
    data.pop("fusion")
    (folder / "config.json").write_text(json.dumps(data))
    loaded = VisionLanguageModel.from_pretrained(folder)
    assert loaded.config.fusion.kind == "autoregressive" and loaded.config.projector.num_queries is None
    ids = torch.tensor([[5] + [49152] * model.config.image_tokens_per_image + [6, 7]])
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pixels).logits, model.eval()(ids, pixels).logits)


# ----------------------------------------------------------------------------------------------
# A new connector, registered here and nowhere else, trains through the normal entry point


@pytest.fixture
def pooling_connector():
    @registry.register_connector("test_mean_pool")
    class MeanPoolConnector(nn.Module):
        """Average each r x r block of patches (instead of concatenating them), then one linear layer."""

        def __init__(self, cfg: ProjectorConfig, vision_hidden_size: int, decoder_hidden_size: int):
            super().__init__()
            self.r = cfg.shuffle_factor
            self.proj = nn.Linear(vision_hidden_size, decoder_hidden_size)

        def forward(self, patches):
            b, n, d = patches.shape
            blocks = pixel_shuffle(patches, self.r).view(b, n // self.r**2, self.r**2, d)
            return self.proj(blocks.mean(2))

    yield MeanPoolConnector
    registry.unregister("connector", "test_mean_pool")


def test_a_connector_registered_in_a_test_file_trains_with_the_trainer(pooling_connector, tmp_path):
    config = get_profile("tiny").config
    config.projector.kind = "test_mean_pool"
    torch.manual_seed(0)
    model = VisionLanguageModel(config)
    assert isinstance(model.projector, pooling_connector)
    processor = VLMProcessor.from_config(config, system_prompt=None)
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
    rows = [{"images": [Image.new("RGB", (64, 64), rgb)],
             "texts": [{"user": "What colour is the image?", "assistant": name, "source": "test"}]}
            for name, rgb in colours.items()]
    before = model.projector.proj.weight.detach().clone()
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), batch_size=4, max_steps=3, precision="fp32", progress=False,
                      decoder="lora", warmup_fraction=0.0)
    trainer = Trainer(model, processor, rows, cfg)
    history = trainer.fit()
    assert trainer.trainable["projector"] == model.projector.proj.weight.numel() + model.projector.proj.bias.numel()
    losses = [r["loss"] for r in history["train"]]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # the same four rows each step: the loss goes down
    assert not torch.equal(model.projector.proj.weight, before)
    with safe_open(next((tmp_path / "run").glob("checkpoint-*")) / "trainable.safetensors", framework="pt") as f:
        assert "projector.proj.weight" in set(f.keys())
