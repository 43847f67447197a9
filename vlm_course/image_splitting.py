"""Image splitting as Idefics3 and SmolVLM do it: tiles at the encoder's size, plus the whole image downscaled.

A vision encoder reads one fixed square (SmolVLM: 512 px, Idefics3: 364 px). Squash a 2048 x 1536 page into it and
the small print is gone. Idefics3 (and SmolVLM, and nanoVLM after it) keep the encoder and feed it more squares:

    1. resize the image so that its longest edge is `longest_edge` (aspect ratio kept, the short side rounded to even)
    2. resize it again so both sides are whole multiples of `tile_size` (each side rounded *up*)
    3. cut that into rows x cols tiles of tile_size x tile_size, row by row: the local views
    4. resize the step-2 image to tile_size x tile_size: the global view, which sees the whole layout at once

An image that fits in one tile after step 2 is not split: it is one view (rows = cols = 0 in Idefics3's words).
Every view goes through the encoder and the projector on its own and becomes `image_seq_len` <image> tokens.
The prompt says where each tile sits (`image_prompt_string`):

    <fake_token_around_image><row_1_col_1><image>...<fake_token_around_image><row_1_col_2><image>...\\n
    <fake_token_around_image><row_2_col_1><image>...<fake_token_around_image><row_2_col_2><image>...\\n
    \\n<fake_token_around_image><global-img><image>...<fake_token_around_image>

The sizes and the order of the PIL calls are transformers' (models/idefics3/image_processing_pil_idefics3.py:
`resize`, `resize_for_vision_encoder`, `split_images`; the prompt is `Idefics3Processor.replace_image_token` in
processing_idefics3.py), so the same filter gives the same pixels. Sources: SmolVLM (Marafioti et al. 2025,
arXiv:2504.05299), Idefics3 (Laurencon et al. 2024, arXiv:2408.12637); docs/image_splitting.md has the token counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

# Idefics3's markers. transformers' Idefics3Processor adds <fake_token_around_image> and <image> to the tokenizer;
# <global-img> is one token in SmolVLM's tokenizer, and Idefics3Processor looks <row_i_col_j> up as one (`row_col_tokens`).
FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TAG = "<fake_token_around_image>", "<image>", "<global-img>"
# transformers caps the resized image at 4k on its longest side (image_processing_idefics3.MAX_IMAGE_SIZE).
MAX_IMAGE_SIZE = 4096
# Idefics3Processor looks up the <row_i_col_j> ids (its row_col_ids) for grids of up to 6 x 6 tiles.
IDEFICS3_MAX_GRID_SIDE = 6


@dataclass
class SplitImage:
    """One image cut for the encoder: `rows` x `cols` tiles (row by row) and the global view, all square RGB PIL
    images of the tile size. rows = cols = 0 means the image was not split: `tiles` is empty and `global_image`
    is the only view."""

    tiles: list[Image.Image]
    global_image: Image.Image
    rows: int
    cols: int

    @property
    def views(self) -> list[Image.Image]:
        """What the encoder reads, in the order the prompt names them: the tiles, then the global view."""
        return [*self.tiles, self.global_image]


def check_sizes(longest_edge: int, tile_size: int) -> None:
    """Refuse sizes that cannot describe a split, with what to do."""
    for name, value in (("longest_edge", longest_edge), ("tile_size", tile_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive whole number of pixels, got {value!r}")
    if tile_size > longest_edge:
        raise ValueError(f"the tile ({tile_size} px) is larger than the longest edge the image is resized to "
                         f"({longest_edge} px): every image would be one tile; raise longest_edge to a multiple of "
                         "the tile (Idefics3: 4 x 364, SmolVLM: 4 x 512) or turn splitting off")


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Step 1: (height, width) with the longest side at `longest_edge`, the other scaled to keep the aspect ratio
    (truncated, then rounded up to even), then both kept under MAX_IMAGE_SIZE. Images smaller than `longest_edge`
    are scaled *up*. transformers' `_resize_output_size_rescale_to_max_len` and
    `_resize_output_size_scale_below_upper_bound`, expression for expression (the float rounding decides a pixel)."""
    aspect_ratio = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect_ratio)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect_ratio)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    aspect_ratio = width / height
    if width >= height and width > MAX_IMAGE_SIZE:
        width, height = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE / aspect_ratio)
    elif height > width and height > MAX_IMAGE_SIZE:
        height, width = MAX_IMAGE_SIZE, int(MAX_IMAGE_SIZE * aspect_ratio)
    return max(height, 1), max(width, 1)


def tile_multiple_size(height: int, width: int, tile_size: int) -> tuple[int, int]:
    """Step 2: (height, width) rounded up to whole tiles, the longest side first (transformers'
    `resize_for_vision_encoder`). The short side is re-derived from the rounded long one, then rounded up itself."""
    aspect_ratio = width / height
    if width >= height:
        width = math.ceil(width / tile_size) * tile_size
        height = math.ceil(int(width / aspect_ratio) / tile_size) * tile_size
    else:
        height = math.ceil(height / tile_size) * tile_size
        width = math.ceil(int(height * aspect_ratio) / tile_size) * tile_size
    return height, width


def split_grid(width: int, height: int, longest_edge: int, tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles an image of width x height px is cut into; (0, 0) when it is not split. Needs no
    pixels: this is what sets an image's token count (`image_token_count`)."""
    check_sizes(longest_edge, tile_size)
    h, w = tile_multiple_size(*longest_edge_size(height, width, longest_edge), tile_size)
    if h > tile_size or w > tile_size:
        return h // tile_size, w // tile_size
    return 0, 0


def split_image(image: Image.Image, longest_edge: int, tile_size: int,
                resample: int = Image.Resampling.BICUBIC, splitting: bool = True, min_side: int = 1) -> SplitImage:
    """Cut an RGB PIL image into tiles of `tile_size` and a global view, as Idefics3's image processor does.

    longest_edge: the image's longest side is resized to this first (Idefics3: 1456 = 4 x 364; SmolVLM: 2048 =
    4 x 512); tile_size: the encoder's input size (transformers' max_image_size["longest_edge"]). resample: the PIL
    filter of every resize (the course: bicubic; SmolVLM's checkpoints say Lanczos). splitting=False is Idefics3's
    do_image_splitting=False: the longest-edge resize, then the image squashed to one tile (rows = cols = 0).
    min_side: refuse images with a side shorter than this (the processor passes the encoder's patch size).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"split_image takes a PIL image, got {type(image).__name__}: open it first "
                        "(vlm_course.processing.open_image) and convert it to RGB")
    check_sizes(longest_edge, tile_size)
    width, height = image.size
    if min(width, height) < max(min_side, 1):
        raise ValueError(f"the image is {width}x{height} px, under {max(min_side, 1)} px on a side: it carries "
                         "almost no information and cannot be tiled; use a larger image")
    h, w = longest_edge_size(height, width, longest_edge)
    image = image.resize((w, h), resample)
    if not splitting:
        return SplitImage([], image.resize((tile_size, tile_size), resample), 0, 0)
    h, w = tile_multiple_size(h, w, tile_size)
    image = image.resize((w, h), resample)
    if h <= tile_size and w <= tile_size:  # one tile: the image is its own global view
        return SplitImage([], image, 0, 0)
    rows, cols = h // tile_size, w // tile_size
    tiles = [image.crop((c * tile_size, r * tile_size, (c + 1) * tile_size, (r + 1) * tile_size))
             for r in range(rows) for c in range(cols)]
    return SplitImage(tiles, image.resize((tile_size, tile_size), resample), rows, cols)


def row_col_token(row: int, col: int) -> str:
    """The marker before the tile at (row, col), counted from 1: <row_1_col_1> is the top-left tile."""
    return f"<row_{row}_col_{col}>"


def row_col_tokens(max_side: int = IDEFICS3_MAX_GRID_SIDE) -> list[str]:
    """Every tile marker of a grid up to max_side x max_side, row by row (Idefics3Processor looks them up for 6 x 6),
    to add to a tokenizer so each marker is one token."""
    return [row_col_token(r + 1, c + 1) for r in range(max_side) for c in range(max_side)]


def image_prompt_string(rows: int, cols: int, image_seq_len: int, fake_token: str = FAKE_IMAGE_TOKEN,
                        image_token: str = IMAGE_TOKEN, global_token: str = GLOBAL_IMAGE_TAG) -> str:
    """The text one image becomes, as transformers' Idefics3Processor writes it: each tile's marker and its
    `image_seq_len` image tokens, a newline after each row, then a blank line and the global view. rows = cols = 0:
    the global view alone, <fake_token_around_image><global-img><image>...<image><fake_token_around_image>."""
    for name, value in (("rows", rows), ("cols", cols), ("image_seq_len", image_seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    if (rows == 0) != (cols == 0):
        raise ValueError(f"a grid of {rows} rows and {cols} columns: both are 0 (not split) or both positive")
    if image_seq_len == 0:
        raise ValueError("image_seq_len must be positive: each view becomes that many image tokens")
    run = image_token * image_seq_len
    global_view = f"{fake_token}{global_token}{run}{fake_token}"
    if rows == 0:
        return global_view
    grid = "".join("".join(f"{fake_token}{row_col_token(r + 1, c + 1)}{run}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{global_view}"


def image_token_count(rows: int, cols: int, image_seq_len: int, blank_line_tokens: int = 1) -> int:
    """Decoder positions one image takes, with every marker one token and "\\n" one token: (seq + 2) per tile
    (marker pair + run), one newline per row, and seq + 3 for the global view. blank_line_tokens: what "\\n\\n"
    costs in the tokenizer (1 in SmolLM2's, which merges it). As transformers' `_get_num_multimodal_tokens`."""
    if rows == 0:
        return image_seq_len + 3
    return rows * (cols * (image_seq_len + 2) + 1) + (blank_line_tokens - 1) + image_seq_len + 3
