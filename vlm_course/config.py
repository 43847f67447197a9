"""Configuration dataclasses for every part of the model, and the course's named profiles.

A VLM here is three parts glued together:

    image -> VisionEncoder (a ViT, as SigLIP) -> ModalityProjector (pixel shuffle + linear) -> Decoder (SmolLM2)

Each part has a plain dataclass config. `VLMConfig` bundles them and knows the one number that
couples them: how many image tokens one image becomes in the decoder's input.

Profiles (DESIGN.md section 3) choose sizes and weight sources:

    tiny  random-init tiny ViT + random-init tiny decoder   tests, CI, nbval: seconds
    smol  course-pretrained small ViT + real SmolLM2-135M   instructor demo on a laptop CPU: minutes
    nano  SigLIP-B/16-224 + SmolLM2-135M from the hub      GPU / Colab: the nanoVLM-222M recipe
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field


@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-6
    # SigLIP normalises pixels to [-1, 1]: mean 0.5, std 0.5 per channel.
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    kind: str = "siglip"  # which registered vision encoder builds this (vlm_course.registry); "siglip": vision.py

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2


@dataclass
class ProjectorConfig:
    shuffle_factor: int = 2  # pixel shuffle ratio r: r*r neighbouring patches become one token
    # Which registered connector builds this (vlm_course.registry): "linear" (nanoVLM, Idefics3), "mlp" (LLaVA-1.5,
    # TinyLLaVA: linear-GELU-linear), "perceiver" (Idefics2: learned queries cross-attending to the patches).
    kind: str = "linear"
    mlp_hidden_size: int | None = None  # for kind="mlp"; defaults to the decoder width
    # None: one token per pixel-shuffled block. A number: the connector writes that many tokens whatever the image
    # size (a perceiver resampler's learned queries; Idefics2 uses 64).
    num_queries: int | None = None
    resampler_layers: int = 3  # perceiver: cross-attention layers over the patches (Idefics2: 3)
    resampler_heads: int = 4  # perceiver: attention heads; must divide the decoder width
    bias: bool = False  # nanoVLM and Idefics3 use one bias-free linear
    # Decoder tokens per pixel-shuffled block. 1 (nanoVLM, Idefics3): one token per block. The demo uses 2, so
    # that a block can be written as two words, "red circle", in the decoder's own embedding space.
    tokens_per_block: int = 1
    # After the blocks, one token per label holding a tally of the picture's objects (`vlm_course.counting`; the
    # demo counts each shape, each colour and all objects). Empty (nanoVLM, Idefics3): no count tokens.
    count_labels: tuple[str, ...] = ()
    # The counter's block classifiers: 0, linear on each block alone; a number, one hidden layer of that width
    # reading the block and its four neighbours (`counting.NeighbourhoodClassifier`; the demo uses 128).
    counter_hidden_size: int = 0

    def __post_init__(self):
        if self.shuffle_factor < 1:
            raise ValueError(f"shuffle_factor must be >= 1, got {self.shuffle_factor}")
        if self.tokens_per_block < 1:
            raise ValueError(f"tokens_per_block must be >= 1, got {self.tokens_per_block}")
        if self.num_queries is not None and self.num_queries < 1:
            raise ValueError(f"num_queries must be >= 1 (or None: one token per block), got {self.num_queries}")
        self.count_labels = tuple(self.count_labels)  # a JSON list reads back as a tuple
        if self.counter_hidden_size < 0:
            raise ValueError(f"counter_hidden_size must be 0 (linear classifiers) or a hidden width, got "
                             f"{self.counter_hidden_size}")


@dataclass
class DecoderConfig:
    vocab_size: int = 49152
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_layers: int = 30
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int | None = None  # defaults to hidden_size // num_heads
    rope_theta: float = 100000.0
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    kind: str = "llama"  # which registered decoder builds this (vlm_course.registry); "llama": decoder.py

    def __post_init__(self):
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads {self.num_heads} must be a multiple of num_kv_heads {self.num_kv_heads} "
                "(grouped-query attention shares each KV head across a whole group of query heads)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")


@dataclass
class FusionConfig:
    """How image tokens reach the decoder. "autoregressive" (nanoVLM, Idefics2/3, SmolVLM): they sit in the
    decoder's input sequence. "cross_attention" (Flamingo): the text holds one marker per image, and gated
    cross-attention blocks inserted before every `cross_attention_every`-th decoder layer read the image tokens."""

    kind: str = "autoregressive"  # which registered fusion builds this (vlm_course.registry; fusion.py)
    cross_attention_every: int = 1  # a block before decoder layers every-1, 2*every-1, ... (Flamingo-3B: 1, 9B: 4)
    mlp_ratio: int = 4  # the width of each block's gated feed-forward layer, in decoder widths (Flamingo: 4)

    def __post_init__(self):
        if self.cross_attention_every < 1 or self.mlp_ratio < 1:
            raise ValueError(f"cross_attention_every and mlp_ratio must be >= 1, got {self.cross_attention_every} "
                             f"and {self.mlp_ratio}")


IMAGE_LAYOUTS = ("plain", "grid", "idefics3")


@dataclass
class HighResConfig:
    """Vary-toy's second vision branch (arXiv 2401.12503, its "new vision vocabulary"): a ViT that reads the picture at a
    higher resolution, with its own patch size and projector; its tokens follow the first branch's in the decoder's
    input (`vlm_course.dual_vision`). The default reads 128 px in 8 px patches (16 x 16 patches) and pixel-shuffles
    by 4: 16 more tokens per image."""

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(
        image_size=128, patch_size=8, hidden_size=192, intermediate_size=768, num_layers=4, num_heads=3))
    shuffle_factor: int = 4

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if self.vision.grid_size % self.shuffle_factor:
            raise ValueError(f"the high-resolution patch grid {self.vision.grid_size}x{self.vision.grid_size} is not "
                             f"divisible by its pixel-shuffle factor {self.shuffle_factor}")

    @property
    def tokens_per_image(self) -> int:
        return (self.vision.grid_size // self.shuffle_factor) ** 2


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    image_token: str = "<image>"
    image_token_id: int | None = None  # set from the tokenizer (processing.load_tokenizer adds the token)
    tokenizer: str = "smollm2"  # name understood by processing.load_tokenizer, or a local path
    max_length: int = 2048  # longest sequence the processor lets through (prompt + answer)
    # Idefics3's image splitting (`vlm_course.image_splitting`, with image_layout="idefics3"): each image is resized
    # so its longest edge is `split_longest_edge` px, cut into tiles of vision.image_size px plus a downscaled global
    # view, and the prompt names each tile's row and column. False (every profile and committed checkpoint): one
    # view per image. None: 4 x vision.image_size, as Idefics3 (1456 = 4 x 364) and SmolVLM (2048 = 4 x 512) do.
    image_splitting: bool = False
    split_longest_edge: int | None = None
    # How the processor lays out one image's tokens. "plain": one run of <image> tokens (nanoVLM). "grid": each
    # block's place in words before its tokens ("top left <image><image> top <image><image> ..."), as Idefics3
    # writes <row_1_col_1> before each tile, so the decoder reads *where* a block is instead of inferring it.
    # "idefics3": Idefics3's / SmolVLM's layout for one unsplit image,
    # "<fake_token_around_image><global-img>" <image> x N "<fake_token_around_image>": what transformers'
    # Idefics3Processor writes, so a model trained with it answers the same in transformers
    # (`VisionLanguageModel.save_idefics3`).
    image_layout: str = "plain"
    # None (every profile, every committed checkpoint): one vision branch. A HighResConfig adds Vary-toy's second,
    # high-resolution branch; the processor then resizes images to its size and the first branch sees them downsampled.
    high_res: HighResConfig | None = None

    def __post_init__(self):
        # Accept plain dicts (as read back from config.json).
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.projector, dict):
            self.projector = ProjectorConfig(**self.projector)
        if isinstance(self.decoder, dict):
            self.decoder = DecoderConfig(**self.decoder)
        if isinstance(self.fusion, dict):
            self.fusion = FusionConfig(**self.fusion)
        grid, r = self.vision.grid_size, self.projector.shuffle_factor
        if grid % r:
            raise ValueError(
                f"the patch grid {grid}x{grid} (image_size {self.vision.image_size} / patch_size "
                f"{self.vision.patch_size}) is not divisible by the pixel-shuffle factor {r}"
            )
        if self.image_layout not in IMAGE_LAYOUTS:
            raise ValueError(f"image_layout must be one of {IMAGE_LAYOUTS}, got {self.image_layout!r}")
        if isinstance(self.high_res, dict):
            self.high_res = HighResConfig(**self.high_res)
        if self.high_res is not None:
            self.check_high_res()
        if self.image_layout == "idefics3" and (self.projector.tokens_per_block != 1 or self.projector.count_labels):
            raise ValueError("image_layout='idefics3' has one <image> token per pixel-shuffled block and no count "
                             f"tokens: set projector.tokens_per_block=1 (got {self.projector.tokens_per_block}) and "
                             f"projector.count_labels=() (got {self.projector.count_labels!r})")
        one_token_per_block = self.projector.num_queries is None and self.fusion.kind == "autoregressive"
        if self.image_layout == "grid" and not one_token_per_block:
            raise ValueError("image_layout='grid' writes each block's place before its tokens, so it needs tokens that "
                             "are blocks: projector.num_queries=None and fusion.kind='autoregressive'; use "
                             "image_layout='plain'")
        if self.fusion.kind != "autoregressive" and self.projector.count_labels:
            raise ValueError("count tokens are written into the text after the image tokens: they need "
                             "fusion.kind='autoregressive' (set projector.count_labels=())")
        if self.image_splitting and self.image_layout != "idefics3":
            raise ValueError("image splitting writes Idefics3's <row_i_col_j> tile markers: set image_layout='idefics3' "
                             f"(got {self.image_layout!r}) or image_splitting=False")
        if self.split_longest_edge is not None and self.split_longest_edge < self.vision.image_size:
            raise ValueError(f"split_longest_edge {self.split_longest_edge} is below the tile size (vision.image_size "
                             f"{self.vision.image_size}): every image would be one tile; raise it or set it to None")

    @property
    def block_grid_size(self) -> int:
        """Blocks per side after pixel shuffle: (image_size / patch_size) / r."""
        return self.vision.grid_size // self.projector.shuffle_factor

    @property
    def connector_tokens_per_image(self) -> int:
        """Tokens the connector makes of one image: num_queries if set (a resampler), else (image_size /
        patch_size)^2 / r^2 blocks x tokens_per_block."""
        if self.projector.num_queries is not None:
            return self.projector.num_queries
        return self.block_grid_size**2 * self.projector.tokens_per_block

    @property
    def image_tokens_per_image(self) -> int:
        """Tokens one image costs in the decoder's input: the connector's tokens, plus one per count label, plus the
        high-resolution branch's tokens if there is one (fully autoregressive fusion); or a single marker
        (cross-attention fusion: the image enters through layers of its own)."""
        if self.fusion.kind != "autoregressive":
            return 1
        return (self.connector_tokens_per_image + len(self.projector.count_labels)
                + self.high_res_tokens_per_image)

    @property
    def high_res_tokens_per_image(self) -> int:
        """Tokens the second, high-resolution branch adds per image (0 without one)."""
        return 0 if self.high_res is None else self.high_res.tokens_per_image

    @property
    def pixel_size(self) -> int:
        """The side the processor resizes images to: the high-resolution branch's when there is one."""
        return self.vision.image_size if self.high_res is None else self.high_res.vision.image_size

    def check_high_res(self) -> None:
        """The two branches share one pixel tensor (at the high-res size, downsampled for the first branch), and the
        second branch's tokens follow a plain run of the first's."""
        high = self.high_res.vision
        if high.image_size < self.vision.image_size:
            raise ValueError(f"high_res.vision.image_size {high.image_size} is below the first branch's "
                             f"{self.vision.image_size}: the second branch must read the picture at a higher resolution")
        if (tuple(high.image_mean), tuple(high.image_std)) != (tuple(self.vision.image_mean), tuple(self.vision.image_std)):
            raise ValueError("the two vision branches read one normalised pixel tensor: give high_res.vision the same "
                             f"image_mean/image_std as vision ({self.vision.image_mean}, {self.vision.image_std})")
        if self.image_layout != "plain" or self.projector.count_labels:
            raise ValueError("a second vision branch appends its tokens to a plain run of <image> tokens: use "
                             f"image_layout='plain' (got {self.image_layout!r}) and no count labels")

    @property
    def image_longest_edge(self) -> int:
        """The longest edge images are resized to before splitting (split_longest_edge, else 4 tiles)."""
        return self.split_longest_edge or 4 * self.vision.image_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "VLMConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VLMConfig fields {sorted(unknown)}: is this a vlm_course config.json?")
        return cls(**d)

    def save(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path) -> "VLMConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


# ----------------------------------------------------------------------------------------------
# Profiles


@dataclass
class Profile:
    name: str
    config: VLMConfig
    vision_weights: str | None  # None: random init; else a name for weights.resolve or a local path
    decoder_weights: str | None
    data: str  # "mini-cauldron" (offline, assets/) or "the_cauldron" (hub)
    description: str = ""


SMOLLM2_135M = DecoderConfig()  # the defaults above are SmolLM2-135M's

# The tokenizer is always the real SmolLM2 one, so the vocabulary is 49152 even in `tiny`.
TINY = VLMConfig(
    vision=VisionConfig(image_size=64, patch_size=8, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4),
    projector=ProjectorConfig(shuffle_factor=2),
    decoder=DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                          rope_theta=10000.0, max_position_embeddings=1024),
    max_length=512,
)

# `smol`: the ViT the course pretrains on synthetic 64 px images (`python -m vlm_course.pretrain_vit`).
SMOL = VLMConfig(
    vision=VisionConfig(image_size=64, patch_size=8, hidden_size=192, intermediate_size=768, num_layers=4,
                        num_heads=3),
    projector=ProjectorConfig(shuffle_factor=2),
    decoder=DecoderConfig(),
    max_length=512,
)

# `nano`: nanoVLM v0.1, 222M parameters. SigLIP-B/16-224 has 196 patches -> 49 image tokens of 576.
NANO = VLMConfig(
    vision=VisionConfig(),
    projector=ProjectorConfig(shuffle_factor=2),
    decoder=DecoderConfig(),
    max_length=1024,
)

PROFILES = {
    "tiny": Profile("tiny", TINY, None, None, "mini-cauldron", "random-init tiny model: tests, CI, nbval"),
    "smol": Profile("smol", SMOL, "course-vit-smol", "HuggingFaceTB/SmolLM2-135M-Instruct", "mini-cauldron",
                    "course-pretrained ViT + real SmolLM2-135M-Instruct, offline: instructor demo on a CPU"),
    "nano": Profile("nano", NANO, "google/siglip-base-patch16-224", "HuggingFaceTB/SmolLM2-135M-Instruct",
                    "the_cauldron", "the nanoVLM-222M recipe: needs the hub and a GPU"),
}


def default_profile_name() -> str:
    """The profile the hardware suits: `nano` with a CUDA GPU, else `smol` on a CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            return "nano"
    except ImportError:
        pass
    return "smol"


def get_profile(name: str | None = None) -> Profile:
    """Return a profile by name; None reads VLM_COURSE_PROFILE, else picks by hardware.

    Configs are deep-copied so callers may edit them freely.
    """
    name = name or os.environ.get("VLM_COURSE_PROFILE") or default_profile_name()
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}: choose one of {sorted(PROFILES)} (env VLM_COURSE_PROFILE)")
    p = PROFILES[name]
    return dataclasses.replace(p, config=VLMConfig.from_dict(p.config.to_dict()))
