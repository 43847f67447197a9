"""The processor: turns images and conversations into the tensors the VLM reads.

    image  -> RGB -> resize to the encoder's size -> [0, 1] -> (x - mean) / std      pixel_values (N, 3, H, W)
    turns  -> SmolLM2's chat template, with each image expanded to `image_tokens_per_image` copies of the
              <image> token (the model later overwrites those positions with projected image features)
           -> input_ids, attention_mask, and labels that are -100 everywhere except the assistant's answers

The chat format is SmolLM2-Instruct's (ChatML):

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

We build the token ids piece by piece (so we know which tokens are answers) and the tests prove that the
result equals `tokenizer.apply_chat_template` on the same conversation.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import VisionConfig, VLMConfig
from .image_splitting import (
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TAG,
    IMAGE_TOKEN,
    image_prompt_string,
    row_col_tokens,
    split_image,
)

IGNORE_INDEX = -100  # cross-entropy skips these label positions
# Idefics3's wrappers (image_layout="idefics3"): one unsplit image is
# <fake_token_around_image><global-img><image>...<image><fake_token_around_image>. transformers' Idefics3Processor
# adds the first three of these special tokens to its tokenizer, in this order; <global-img> is one token in SmolVLM's
# tokenizer, and llama.cpp's multimodal tool looks it up as one, so the course adds it too. Split images
# (VLMConfig.image_splitting) add the <row_i_col_j> tile markers too: Idefics3Processor looks them up as single tokens.
END_OF_UTTERANCE = "<end_of_utterance>"
IDEFICS3_SPECIAL_TOKENS = (FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE, GLOBAL_IMAGE_TAG)
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


# ----------------------------------------------------------------------------------------------
# Images


def array_to_uint8_hwc(array: np.ndarray) -> np.ndarray:
    """An image array in one of the common forms -> H x W (x C) uint8.

    Accepted: uint8 (0-255); floats in [0, 1] (matplotlib, torchvision's ToTensor) or in [0, 255]; channels last
    (H, W, C) or first (C, H, W, as torch tensors are) with C = 1, 3 or 4. Anything else is refused: a guess
    would silently feed the model a wrong picture.
    """
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # CHW -> HWC
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"an image array must be H x W, H x W x 3/4 or 3/4 x H x W, got shape {array.shape}")
    if array.dtype == np.uint8:
        return array
    if array.dtype == bool or not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"image arrays must hold numbers (uint8 or floats), got {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("the image array holds NaN or infinite values: the image data is broken")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"image values run from {low:g} to {high:g}: expected 0-1 (floats) or 0-255; if the array "
                         "is normalised (mean/std), undo that first")
    scale = 255.0 if np.issubdtype(array.dtype, np.floating) and high <= 1.0 else 1.0
    return np.clip(np.rint(array.astype(np.float64) * scale), 0, 255).astype(np.uint8)


def open_image(image) -> Image.Image:
    """Accept a PIL image, a path, raw bytes, a {'bytes': ...} dict (HF datasets / parquet) or an HxWxC array."""
    if isinstance(image, Image.Image):
        return image
    try:
        # Photos from phones store "rotate me" in EXIF; transformers' load_image applies it, and so do we.
        if isinstance(image, (str, os.PathLike)):
            return ImageOps.exif_transpose(Image.open(Path(image)))
        if isinstance(image, (bytes, bytearray)):
            return ImageOps.exif_transpose(Image.open(io.BytesIO(image)))
        if isinstance(image, dict) and image.get("bytes") is not None:
            return ImageOps.exif_transpose(Image.open(io.BytesIO(image["bytes"])))
        if isinstance(image, np.ndarray):
            return Image.fromarray(array_to_uint8_hwc(image))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"could not decode the image ({err}): is the file a PNG/JPEG and complete?") from err
    raise ValueError(f"expected a PIL image, a path, bytes or an array, got {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB. Transparent pixels become white (not black, which RGBA->RGB would give)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit / 32-bit greyscale: rescale the actual range to 0..255 before going to 8 bits.
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        return Image.fromarray(array.astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


class ImageTransform:
    """Resize to the encoder's square size, scale to [0, 1], normalise per channel: -> (3, H, W) float tensor."""

    def __init__(self, cfg: VisionConfig, size: int | None = None):
        # size: the side to resize to when it is not the encoder's (a second, high-resolution branch,
        # `vlm_course.dual_vision`, reads this size): then no image smaller than it is upsampled to it.
        self.size, self.upsamples = size or cfg.image_size, size is None
        self.min_size = cfg.patch_size
        self.mean = torch.tensor(cfg.image_mean).view(3, 1, 1)
        self.std = torch.tensor(cfg.image_std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        image = open_image(image)
        try:
            image.load()
        except OSError as err:
            raise ValueError(f"the image file is truncated or corrupt ({err}): re-download or re-save it") from err
        if min(image.size) < self.min_size:
            raise ValueError(
                f"the image is {image.size[0]}x{image.size[1]} px, smaller than one {self.min_size}px patch: "
                "it carries almost no information; use a larger image"
            )
        if not self.upsamples and min(image.size) < self.size:
            raise ValueError(f"the image is {image.size[0]}x{image.size[1]} px, smaller than the {self.size} px the "
                             "high-resolution branch reads: upsampling adds no detail for it to read; give an image of at "
                             f"least {self.size} px a side (e.g. synthetic.generate(..., image_size={self.size}))")
        image = to_rgb(image).resize((self.size, self.size), Image.Resampling.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
        return (pixels - self.mean) / self.std

    def split(self, image, longest_edge: int, tile_size: int) -> tuple[torch.Tensor, int, int]:
        """Idefics3's image splitting (`vlm_course.image_splitting.split_image`, bicubic as above): the tiles and
        the global view, each normalised, as (rows * cols + 1, 3, tile, tile), tiles row by row; and the grid's rows
        and cols ((0, 0): the image was not split and is one view)."""
        image = open_image(image)
        try:
            image.load()
        except OSError as err:
            raise ValueError(f"the image file is truncated or corrupt ({err}): re-download or re-save it") from err
        cut = split_image(to_rgb(image), longest_edge, tile_size, Image.Resampling.BICUBIC, min_side=self.min_size)
        views = [torch.from_numpy(np.asarray(view, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
                 for view in cut.views]
        return (torch.stack(views) - self.mean) / self.std, cut.rows, cut.cols


# ----------------------------------------------------------------------------------------------
# Where a block sits, in words (image_layout="grid")

# A 3 x 3 grid is named as people name the parts of a picture (and as the mini-cauldron's position answers).
POSITION_WORDS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def grid_labels(side: int) -> list[str]:
    """Names of the blocks of a side x side grid, row by row: the nine position words for 3 x 3, else 'row i col j'."""
    if side == 3:
        return list(POSITION_WORDS)
    return [f"row {i + 1} col {j + 1}" for i in range(side) for j in range(side)]


# ----------------------------------------------------------------------------------------------
# Tokenizer


def load_tokenizer(name: str = "smollm2"):
    """The SmolLM2 tokenizer (committed in assets/, no download) with the <image> token added."""
    from transformers import AutoTokenizer

    from .weight_files import assets_dir

    path = assets_dir() / "tokenizers" / "smollm2" if name == "smollm2" else name
    tokenizer = AutoTokenizer.from_pretrained(path)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        # A special token is never split or merged by BPE, so one <image> is always exactly one id.
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer


# ----------------------------------------------------------------------------------------------
# The processor


class VLMProcessor:
    def __init__(self, tokenizer, config: VLMConfig, system_prompt: str | None = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.config = config
        self.system_prompt = system_prompt
        if config.image_layout == "idefics3" and any(t not in tokenizer.get_vocab() for t in IDEFICS3_SPECIAL_TOKENS):
            # As Idefics3Processor does, so the ids agree with the tokenizer transformers loads.
            tokenizer.add_special_tokens({"additional_special_tokens": list(IDEFICS3_SPECIAL_TOKENS)})
        if config.image_splitting:
            # one token per tile marker, for every grid the longest edge allows (at least the 6 x 6 Idefics3Processor knows)
            side = max(6, -(-config.image_longest_edge // config.vision.image_size))
            markers = [t for t in row_col_tokens(side) if t not in tokenizer.get_vocab()]
            tokenizer.add_tokens(markers, special_tokens=True)  # never split by BPE, skipped when decoding
        self.image_transform = ImageTransform(config.vision, config.high_res and config.pixel_size)
        self.image_token_id = tokenizer.convert_tokens_to_ids(config.image_token)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {config.image_token!r} token: load it with load_tokenizer()")
        config.image_token_id = self.image_token_id
        self.tokens_per_image = config.image_tokens_per_image
        self.image_block = self.image_block_ids()
        self.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id

    @classmethod
    def from_config(cls, config: VLMConfig, **kwargs) -> "VLMProcessor":
        return cls(load_tokenizer(config.tokenizer), config, **kwargs)

    # -- pieces -------------------------------------------------------------------------------

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def preprocess_images(self, images) -> torch.Tensor:
        """Images -> pixel_values (N, 3, H, W); with image splitting, each image's tiles and global view in turn."""
        if self.config.image_splitting:
            return self.image_inputs(images)[0]
        if not images:
            return torch.zeros(0, 3, self.config.pixel_size, self.config.pixel_size)
        return torch.stack([self.image_transform(image) for image in images])

    def image_inputs(self, images) -> tuple[torch.Tensor, list[list[int]]]:
        """Images -> (pixel_values, each image's prompt ids). Unsplit, every image is one view and the same block
        (`image_block_ids`). Split (config.image_splitting), an image is its views, tiles then global, and its grid's
        block (`image_prompt_string`), as transformers' Idefics3Processor writes them."""
        if not self.config.image_splitting:
            return self.preprocess_images(images), [self.image_block] * len(images)
        tile = self.config.vision.image_size
        if not images:
            return torch.zeros(0, 3, tile, tile), []
        views, blocks = [], []
        for image in images:
            pixels, rows, cols = self.image_transform.split(image, self.config.image_longest_edge, tile)
            views.append(pixels)
            # one string tokenised at once, as transformers tokenises the whole prompt: the markers are special
            # tokens, and the "\n\n" before the global view is one token
            blocks.append(self.text_ids(image_prompt_string(rows, cols, self.tokens_per_image)))
        return torch.cat(views), blocks

    def image_block_ids(self) -> list[int]:
        """The ids one image becomes: `tokens_per_image` <image> ids, with each block's place in words before its
        tokens when config.image_layout is "grid" (" top left" <image> <image> " top" <image> <image> ...), then each
        count label with its count token, if the projector has count labels. "idefics3": Idefics3's wrappers around
        the run of <image> ids (<fake_token_around_image><global-img> ... <fake_token_around_image>)."""
        per_block = self.config.projector.tokens_per_block
        if self.config.image_layout == "idefics3":
            return (self.text_ids(FAKE_IMAGE_TOKEN + GLOBAL_IMAGE_TAG) + [self.image_token_id] * self.tokens_per_image
                    + self.text_ids(FAKE_IMAGE_TOKEN))
        if self.config.image_layout == "plain":
            # then the second branch's tokens, if the model has one (VLMConfig.high_res)
            # (a resampler's queries, or one marker for cross-attention fusion: `tokens_per_image` counts them all)
            ids = [self.image_token_id] * (self.tokens_per_image - len(self.config.projector.count_labels))
        else:
            ids = []
            for label in grid_labels(self.config.block_grid_size):
                ids += self.text_ids(" " + label) + [self.image_token_id] * per_block
        for label in self.config.projector.count_labels:  # count tokens: " circles" <image> ... " objects" <image>
            ids += self.text_ids(" " + label) + [self.image_token_id]
        return ids if self.config.image_layout == "plain" else ids + self.text_ids("\n")

    def user_content_ids(self, text: str, num_images: int, blocks: list[list[int]] | None = None) -> list[int]:
        """The user's message with image blocks: where the text has <image> markers, else before the text.
        blocks: each image's ids (split images differ from each other); default `image_block` for each."""
        blocks = [self.image_block] * num_images if blocks is None else blocks
        parts = text.split(IMAGE_TOKEN)
        if len(parts) == 1:  # no markers: images first, as nanoVLM does
            return [i for block in blocks for i in block] + self.text_ids(text)
        if len(parts) - 1 != num_images:
            raise ValueError(f"the text has {len(parts) - 1} {IMAGE_TOKEN} markers but {num_images} images were given")
        ids = self.text_ids(parts[0])
        for block, part in zip(blocks, parts[1:]):
            ids += block + self.text_ids(part)
        return ids

    # -- conversations ------------------------------------------------------------------------

    def encode_conversation(self, turns: list[dict], images=(), add_generation_prompt: bool = False) -> dict:
        """Tokenise a conversation in the_cauldron's format: turns = [{"user": ..., "assistant": ...}, ...].

        Images (all of them) go into the first user turn. Labels are the answer tokens plus the closing
        <|im_end|> of every assistant turn (so the model learns to stop); -100 elsewhere. With
        add_generation_prompt the last turn's assistant answer may be missing: the prompt ends with
        "<|im_start|>assistant\\n", ready for `generate`.
        """
        if not turns:
            raise ValueError("the conversation has no turns: each sample needs at least one user question")
        pixel_values, blocks = self.image_inputs(list(images))
        input_ids: list[int] = []
        labels: list[int] = []

        def add(ids, trained: bool):
            input_ids.extend(ids)
            labels.extend(ids if trained else [IGNORE_INDEX] * len(ids))

        if self.system_prompt is not None:
            add(self.text_ids(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n"), False)
        for i, turn in enumerate(turns):
            user = turn.get("user")
            if user is None or not isinstance(user, str):
                raise ValueError(f"turn {i}'s question is {type(user).__name__}, not text: give every image a question "
                                 "string (None often means a missing value in the data)")
            if not user.strip():
                raise ValueError(f"turn {i} has an empty user message: {turn!r}")
            if i > 0 and IMAGE_TOKEN in user:
                raise ValueError(f"turn {i} has an {IMAGE_TOKEN} marker, but images go in the first user turn only: "
                                 f"move the marker (and its image) to turn 0")
            add(self.text_ids("<|im_start|>user\n"), False)
            add(self.user_content_ids(user, len(blocks), blocks) if i == 0 else self.user_content_ids(user, 0), False)
            add(self.text_ids("<|im_end|>\n<|im_start|>assistant\n"), False)
            answer = turn.get("assistant")
            last = i == len(turns) - 1
            if answer is None and last and add_generation_prompt:
                break
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"turn {i} has an empty assistant answer: {turn!r}")
            add(self.text_ids(answer) + [self.eos_token_id], True)
            add(self.text_ids("\n"), False)
        if len(input_ids) > self.config.max_length:
            raise ValueError(
                f"the sample is {len(input_ids)} tokens long, over max_length={self.config.max_length}: shorten "
                "the text, use fewer images, or raise VLMConfig.max_length (within the decoder's context)"
            )
        return {"input_ids": torch.tensor(input_ids), "labels": torch.tensor(labels), "pixel_values": pixel_values}

    def encode_prompt(self, question: str, images=()) -> dict:
        """A single question, ready for generation."""
        return self.encode_conversation([{"user": question}], images, add_generation_prompt=True)

    # -- batching -----------------------------------------------------------------------------

    def pad(self, samples: list[dict], padding_side: str = "right") -> dict:
        """Pad encoded samples into a batch. Training pads on the right; generation on the left, so that every
        row's last position is its real last token and new tokens line up."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        longest = max(len(s["input_ids"]) for s in samples)
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for s in samples:
            n = len(s["input_ids"])
            pad = longest - n
            labels = s.get("labels", torch.full((n,), IGNORE_INDEX))
            pieces = {
                "input_ids": (s["input_ids"], torch.full((pad,), self.pad_token_id)),
                "attention_mask": (torch.ones(n, dtype=torch.long), torch.zeros(pad, dtype=torch.long)),
                "labels": (labels, torch.full((pad,), IGNORE_INDEX)),
            }
            for key, (real, padding) in pieces.items():
                batch[key].append(torch.cat([padding, real] if padding_side == "left" else [real, padding]))
        out = {key: torch.stack(rows) for key, rows in batch.items()}
        out["pixel_values"] = torch.cat([s["pixel_values"] for s in samples])  # images in order of appearance
        return out

    def __call__(self, images, questions, answers=None, padding_side: str | None = None) -> dict:
        """Batch of (image or list of images, question[, answer]) -> input_ids, attention_mask, pixel_values, labels.

        With answers: a training batch (right padding, answer-only labels). Without: a generation batch
        (left padding).
        """
        if isinstance(questions, str):
            images, questions = [images], [questions]
            answers = None if answers is None else [answers]
        if len(images) != len(questions):
            raise ValueError(f"got {len(images)} images for {len(questions)} questions: pass one image (or list) each")
        samples = []
        for i, (image, question) in enumerate(zip(images, questions)):
            image_list = image if isinstance(image, (list, tuple)) else [image]
            if answers is None:
                samples.append(self.encode_prompt(question, image_list))
            else:
                samples.append(self.encode_conversation([{"user": question, "assistant": answers[i]}], image_list))
        return self.pad(samples, padding_side or ("left" if answers is None else "right"))

    def decode(self, token_ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens).strip()

    def batch_decode(self, token_ids) -> list[str]:
        return [self.decode(row) for row in token_ids]
