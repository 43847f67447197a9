"""Parts by name: swap a vision encoder, connector, decoder or fusion by adding one file.

TinyLLaVA Factory (github.com/TinyLLaVA/TinyLLaVA_Factory, tinyllava/model/) registers each component under a
name, and a config names the parts it wants. The course does the same, with four families of parts:

    family      config field         built-in kinds
    vision      vision.kind          "siglip"        (vision.py)
    connector   projector.kind       "linear", "mlp", "perceiver"   (projector.py, connectors.py)
    decoder     decoder.kind         "llama"         (decoder.py)
    fusion      fusion.kind          "autoregressive", "cross_attention"   (fusion.py)

A new kind is one class with one decorator, in a file of its own (a test, a notebook cell, your script):

    from vlm_course.registry import register_connector

    @register_connector("my_connector")
    class MyConnector(nn.Module):
        def __init__(self, cfg, vision_hidden_size, decoder_hidden_size): ...
        def forward(self, patches): ...       # (B, patches, vision width) -> (B, tokens, decoder width)

then `ProjectorConfig(kind="my_connector")` and `VisionLanguageModel(config)` builds it. A kind exists once the
file that defines it has been imported; nothing else in the library changes. Each family's constructor takes
the same arguments (the `build_*` functions below), so the model builds any kind the same way.

This module imports nothing of the course: every part file can import it, and it sits at the bottom of the
layers.
"""

from __future__ import annotations

FAMILIES = {  # family -> the config field that names its kind
    "vision": "vision.kind",
    "connector": "projector.kind",
    "decoder": "decoder.kind",
    "fusion": "fusion.kind",
}

_PARTS: dict[str, dict[str, type]] = {family: {} for family in FAMILIES}


def _register(family: str, name: str):
    if not isinstance(name, str) or not name:
        raise ValueError(f"a {family} kind needs a non-empty name, got {name!r}")

    def decorate(cls):
        existing = _PARTS[family].get(name)
        # Re-running a notebook cell defines the class again: the same module and name replace the old one.
        # Another class under a taken name would silently change what every config with that kind builds.
        if existing is not None and (existing.__module__, existing.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"the {family} kind {name!r} is already registered by {existing.__module__}."
                             f"{existing.__qualname__}: choose another name for {cls.__qualname__}")
        _PARTS[family][name] = cls
        return cls

    return decorate


def register_vision(name: str):
    """Class decorator: a vision encoder kind. cls(vision_cfg); forward(pixel_values (N, 3, H, W)) -> (N, P, Dv)."""
    return _register("vision", name)


def register_connector(name: str):
    """Class decorator: a connector kind. cls(projector_cfg, vision_hidden_size, decoder_hidden_size);
    forward(patches (N, P, Dv)) -> (N, tokens, Dt), with tokens = VLMConfig.connector_tokens_per_image."""
    return _register("connector", name)


def register_decoder(name: str):
    """Class decorator: a decoder kind, called as vlm_course.decoder.Decoder is. cls(decoder_cfg)."""
    return _register("decoder", name)


def register_fusion(name: str):
    """Class decorator: a fusion kind (how image tokens reach the decoder). cls(fusion_cfg, decoder_cfg);
    prepare(model, input_ids, pixel_values) -> (input embeddings, the decoder to run them through)."""
    return _register("fusion", name)


def unregister(family: str, name: str) -> None:
    """Remove a kind (tests that register a throwaway kind clean up with this)."""
    _check_family(family)
    _PARTS[family].pop(name, None)


def registered(family: str) -> list[str]:
    """The kinds of one family registered so far, sorted."""
    _check_family(family)
    return sorted(_PARTS[family])


def part_class(family: str, name: str) -> type:
    """The class registered as `name` in `family`, or an error that lists the kinds and says how to add one."""
    _check_family(family)
    if name not in _PARTS[family]:
        raise ValueError(
            f"unknown {family} kind {name!r} ({FAMILIES[family]} in the config); registered: "
            f"{registered(family)}. A kind exists once the file defining it with @register_{family}({name!r}) "
            "is imported: import that file before building the model")
    return _PARTS[family][name]


def build_vision(cfg):
    """The vision encoder `cfg.kind` names, built from its VisionConfig."""
    return part_class("vision", cfg.kind)(cfg)


def build_connector(cfg, vision_hidden_size: int, decoder_hidden_size: int):
    """The connector `cfg.kind` names (ProjectorConfig), mapping vision width to decoder width."""
    return part_class("connector", cfg.kind)(cfg, vision_hidden_size, decoder_hidden_size)


def build_decoder(cfg):
    """The decoder `cfg.kind` names, built from its DecoderConfig."""
    return part_class("decoder", cfg.kind)(cfg)


def build_fusion(cfg, decoder_cfg):
    """The fusion `cfg.kind` names (FusionConfig), sized for the decoder it joins."""
    return part_class("fusion", cfg.kind)(cfg, decoder_cfg)


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown part family {family!r}: choose one of {list(FAMILIES)}")
