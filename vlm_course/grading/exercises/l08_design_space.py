"""Lesson 08, the design space: MLPConnector, ResamplerAttention, perceiver_flops, GatedCrossAttentionBlock,
image_prompt_string.

References: vlm_course.connectors (MLPConnector, ResamplerAttention, perceiver_flops), vlm_course.fusion
(GatedCrossAttentionBlock) and vlm_course.image_splitting.image_prompt_string (transformers' Idefics3Processor
layout). Mutants are the mistakes learners make; tests/test_grading.py proves each fails with its hint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...config import ProjectorConfig
from ...connectors import MLPConnector, ResamplerAttention, perceiver_flops
from ...fusion import GatedCrossAttentionBlock
from ...image_splitting import (
    FAKE_IMAGE_TOKEN,
    GLOBAL_IMAGE_TAG,
    IMAGE_TOKEN,
    image_prompt_string,
    row_col_token,
)
from ...projector import pixel_shuffle
from ..core import Case, Exercise, Mutant
from ..inputs import load_weights, randn, randomised
from ..registry import register

LESSON = "08"

# ----------------------------------------------------------------------------------------------
# MLPConnector(cfg, vision_hidden_size, decoder_hidden_size): pixel shuffle, Linear - GELU - Linear


class _NoActivation(MLPConnector):
    def forward(self, patches):
        x = pixel_shuffle(patches, self.cfg.shuffle_factor)
        return self.proj[2](self.proj[0](x))


class _ReLU(MLPConnector):
    def forward(self, patches):
        return self.proj[2](F.relu(self.proj[0](pixel_shuffle(patches, self.cfg.shuffle_factor))))


class _TanhGELU(MLPConnector):
    def forward(self, patches):
        x = self.proj[0](pixel_shuffle(patches, self.cfg.shuffle_factor))
        return self.proj[2](F.gelu(x, approximate="tanh"))


class _ActivationAtTheEnd(MLPConnector):
    def forward(self, patches):
        return F.gelu(self.proj[2](self.proj[0](pixel_shuffle(patches, self.cfg.shuffle_factor))))


class _PlainReshape(MLPConnector):
    def forward(self, patches):
        b, n, d = patches.shape
        r = self.cfg.shuffle_factor
        return self.proj(patches.reshape(b, n // r**2, d * r * r))


def _mlp_case(r, vision, decoder, batch, grid, seed, hidden=None, dtype=torch.float32):
    def inputs():
        cfg = ProjectorConfig(shuffle_factor=r, kind="mlp", mlp_hidden_size=hidden)
        state = randomised(MLPConnector(cfg, vision, decoder), seed).state_dict()
        return cfg, vision, decoder, state, randn(batch, grid * grid, vision, seed=seed + 100, dtype=dtype)
    return inputs


def run_connector(cls, cfg, vision_hidden_size, decoder_hidden_size, state, patches):
    module = load_weights(cls(cfg, vision_hidden_size, decoder_hidden_size), state, "MLPConnector", "MLPConnector")
    return module.to(patches.dtype).eval()(patches)


register(Exercise(
    name="MLPConnector", lesson=LESSON, reference=MLPConnector, call=run_connector,
    description="LLaVA-1.5's connector: pixel shuffle, then Linear - GELU - Linear",
    cases=[
        Case("r=2, batch 2, 4x4 grid of width 6 -> hidden 10 -> width 8", _mlp_case(2, 6, 8, 2, 4, 81, hidden=10)),
        Case("no pixel shuffle (r=1), batch 1, 3x3 grid of width 5 -> width 7", _mlp_case(1, 5, 7, 1, 3, 82)),
        Case("r=3, batch 3, 6x6 grid of width 4 -> width 6", _mlp_case(3, 4, 6, 3, 6, 83)),
        Case("float64, r=2, 4x4 grid of width 3 -> width 5", _mlp_case(2, 3, 5, 2, 4, 84, dtype=torch.float64),
             atol=1e-10, rtol=1e-10),
    ],
    mutants=[
        Mutant("no_activation", _NoActivation,
               "two linear layers with nothing between them are one linear layer: put nn.GELU() between them"),
        Mutant("relu", _ReLU, "LLaVA-1.5's projector uses GELU (the exact one, nn.GELU()), not ReLU"),
        Mutant("tanh_gelu", _TanhGELU, "that is GELU's tanh approximation: nn.GELU() (approximate='none') is LLaVA's"),
        Mutant("activation_at_the_end", _ActivationAtTheEnd,
               "the GELU goes between the two linear layers, not after the second (the tokens must be free to be "
               "negative, as word embeddings are)"),
        Mutant("plain_reshape", _PlainReshape,
               "a plain reshape groups r*r consecutive patches of one row: pixel-shuffle first (vlm_course.projector."
               "pixel_shuffle, lesson 02)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# ResamplerAttention(width, num_heads): latents attend to [context; latents]


class _ContextOnly(ResamplerAttention):
    def forward(self, latents, context):
        b, q_len, width = latents.shape

        def heads(x):
            return x.view(b, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(latents)), heads(self.k_proj(context)),
                                             heads(self.v_proj(context)))
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, width))


class _NoScale(ResamplerAttention):
    def forward(self, latents, context):
        b, q_len, width = latents.shape
        both = torch.cat([context, latents], dim=1)

        def heads(x):
            return x.view(b, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        q, k, v = heads(self.q_proj(latents)), heads(self.k_proj(both)), heads(self.v_proj(both))
        out = (q @ k.transpose(-1, -2)).softmax(-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, width))


class _HeadsWithoutTranspose(ResamplerAttention):
    def forward(self, latents, context):
        b, q_len, width = latents.shape
        both = torch.cat([context, latents], dim=1)

        def heads(x):  # (B, T, width) viewed as (B, heads, T, head_dim) directly: heads mix positions
            return x.reshape(b, self.num_heads, x.shape[1], width // self.num_heads)

        out = F.scaled_dot_product_attention(heads(self.q_proj(latents)), heads(self.k_proj(both)),
                                             heads(self.v_proj(both)))
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, width))


class _OneHead(ResamplerAttention):
    def forward(self, latents, context):
        both = torch.cat([context, latents], dim=1)
        out = F.scaled_dot_product_attention(self.q_proj(latents), self.k_proj(both), self.v_proj(both))
        return self.o_proj(out)


class _Causal(ResamplerAttention):
    def forward(self, latents, context):  # the decoder's attention reused, causal mask and all
        b, q_len, width = latents.shape
        both = torch.cat([context, latents], dim=1)

        def heads(x):
            return x.view(b, x.shape[1], self.num_heads, width // self.num_heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q_proj(latents)), heads(self.k_proj(both)),
                                             heads(self.v_proj(both)), is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, q_len, width))


def _attention_case(width, heads, batch, patches, queries, seed, dtype=torch.float32):
    def inputs():
        state = randomised(ResamplerAttention(width, heads), seed).state_dict()
        return (width, heads, state, randn(batch, queries, width, seed=seed + 1, dtype=dtype),
                randn(batch, patches, width, seed=seed + 2, dtype=dtype))
    return inputs


def run_attention(cls, width, num_heads, state, latents, context):
    module = load_weights(cls(width, num_heads), state, "ResamplerAttention", "ResamplerAttention")
    return module.to(latents.dtype).eval()(latents, context)


register(Exercise(
    name="ResamplerAttention", lesson=LESSON, reference=ResamplerAttention, call=run_attention,
    description="a perceiver's attention: the latents ask, the patches and the latents answer",
    cases=[
        Case("width 8, 2 heads, batch 2, 9 patches, 3 latents", _attention_case(8, 2, 2, 9, 3, 91)),
        Case("width 12, 3 heads, batch 1, 16 patches, 4 latents", _attention_case(12, 3, 1, 16, 4, 92)),
        Case("width 6, 1 head, batch 3, 5 patches, 7 latents (more latents than patches)",
             _attention_case(6, 1, 3, 5, 7, 93)),
        Case("float64, width 8, 4 heads, batch 2, 10 patches, 2 latents",
             _attention_case(8, 4, 2, 10, 2, 94, torch.float64), atol=1e-10, rtol=1e-10),
    ],
    mutants=[
        Mutant("context_only", _ContextOnly,
               "the keys and values come from the patches only - Idefics2 and Flamingo concatenate [patches; latents] "
               "so each latent also sees the other latents"),
        Mutant("no_scale", _NoScale,
               "the scores are not divided by sqrt(head_dim): use F.scaled_dot_product_attention, or scale them"),
        Mutant("heads_without_transpose", _HeadsWithoutTranspose,
               "split heads as .view(B, T, heads, head_dim).transpose(1, 2): a reshape straight to (B, heads, T, "
               "head_dim) mixes positions into the heads"),
        Mutant("one_head", _OneHead,
               "one attention over the full width: split into num_heads heads of width // num_heads each"),
        Mutant("causal", _Causal,
               "the resampler is not causal: every latent sees every patch and every latent (no is_causal, no mask; "
               "a decoder's attention hides the future, a perceiver's has none)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# perceiver_flops(num_context, num_queries, width, num_layers, context_width) -> int


def flops_kv_over_patches_only(num_context, num_queries, width, num_layers, context_width):
    return perceiver_flops(num_context, num_queries, width, num_layers, context_width) - num_layers * (
        2 * 2 * num_queries * width * width + 2 * 2 * num_queries * num_queries * width)


def flops_no_input_projection(num_context, num_queries, width, num_layers, context_width):
    return perceiver_flops(num_context, num_queries, width, num_layers, context_width) - 2 * num_context * context_width * width


def flops_gelu_mlp(num_context, num_queries, width, num_layers, context_width):
    return perceiver_flops(num_context, num_queries, width, num_layers, context_width) - num_layers * (
        2 * num_queries * width * 4 * width)


def flops_multiply_adds(num_context, num_queries, width, num_layers, context_width):
    return perceiver_flops(num_context, num_queries, width, num_layers, context_width) // 2


def flops_one_layer(num_context, num_queries, width, num_layers, context_width):
    return perceiver_flops(num_context, num_queries, width, 1, context_width)


def flops_self_attention_over_patches(num_context, num_queries, width, num_layers, context_width):
    """As if every patch also asked (a ViT layer over the patches): the P x P term a resampler avoids."""
    return perceiver_flops(num_context, num_queries, width, num_layers, context_width) + num_layers * (
        2 * 2 * num_context * num_context * width)


register(Exercise(
    name="perceiver_flops", lesson=LESSON, reference=perceiver_flops,
    description="matmul FLOPs of a perceiver resampler on one image",
    cases=[
        Case("Idefics2: 729 patches of 1152, 64 latents, width 4096, 3 layers", lambda: (729, 64, 4096, 3, 1152)),
        Case("the course's smol: 64 patches of 192, 8 latents, width 576, 2 layers", lambda: (64, 8, 576, 2, 192)),
        Case("one latent, one layer, 10 patches of 4, width 6", lambda: (10, 1, 6, 1, 4)),
        Case("after a pixel shuffle by 2: 16 blocks of 768, 4 latents, width 64, 3 layers", lambda: (16, 4, 64, 3, 768)),
    ],
    mutants=[
        Mutant("kv_over_patches_only", flops_kv_over_patches_only,
               "the keys and values run over the patches *and* the latents: P + Q tokens, for the projections and "
               "for the scores"),
        Mutant("no_input_projection", flops_no_input_projection,
               "the patches are first projected from context_width to width, once: 2 x P x context_width x width"),
        Mutant("gelu_mlp", flops_gelu_mlp,
               "the feed-forward is a SwiGLU (gate, up and down): three matrices of width x 4 width, not two"),
        Mutant("multiply_adds", flops_multiply_adds, "count 2 FLOPs per multiply-add (one multiply, one add)"),
        Mutant("one_layer", flops_one_layer, "every one of the num_layers layers pays its attention and feed-forward"),
        Mutant("self_attention_over_patches", flops_self_attention_over_patches,
               "only the latents ask: the scores are Q x (P + Q), with nothing P x P - that is the point of a "
               "resampler"),
    ],
))

# ----------------------------------------------------------------------------------------------
# GatedCrossAttentionBlock(width, num_heads, mlp_ratio, eps): Flamingo's GATED XATTN-DENSE


class _SigmoidGates(GatedCrossAttentionBlock):
    def forward(self, x, images=None, mask=None, has_image=None):
        if images is not None:
            attended = self.cross_attention(self.text_norm(x), images, mask)
            if has_image is not None:
                attended = attended * has_image.unsqueeze(-1).to(attended.dtype)
            x = x + torch.sigmoid(self.attn_gate) * attended
        return x + torch.sigmoid(self.mlp_gate) * self.mlp(self.mlp_norm(x))


class _RawGates(GatedCrossAttentionBlock):
    def forward(self, x, images=None, mask=None, has_image=None):
        if images is not None:
            attended = self.cross_attention(self.text_norm(x), images, mask)
            if has_image is not None:
                attended = attended * has_image.unsqueeze(-1).to(attended.dtype)
            x = x + self.attn_gate * attended
        return x + self.mlp_gate * self.mlp(self.mlp_norm(x))


class _UngatedMLP(GatedCrossAttentionBlock):
    def forward(self, x, images=None, mask=None, has_image=None):
        if images is not None:
            attended = self.cross_attention(self.text_norm(x), images, mask)
            if has_image is not None:
                attended = attended * has_image.unsqueeze(-1).to(attended.dtype)
            x = x + self.attn_gate.tanh() * attended
        return x + self.mlp(self.mlp_norm(x))


class _GatesOpenAtStart(GatedCrossAttentionBlock):
    def __init__(self, width, num_heads, mlp_ratio=4, eps=1e-5):
        super().__init__(width, num_heads, mlp_ratio, eps)
        with torch.no_grad():
            self.attn_gate.fill_(1.0)
            self.mlp_gate.fill_(1.0)


class _IgnoresHasImage(GatedCrossAttentionBlock):
    def forward(self, x, images=None, mask=None, has_image=None):
        return super().forward(x, images, mask, None)


class _NoImageNorm(GatedCrossAttentionBlock):
    def cross_attention(self, x, images, mask):
        b, t, width = x.shape
        head_dim = width // self.num_heads
        q = self.q_proj(x).view(b, t, self.num_heads, head_dim).transpose(1, 2)
        k = self.k_proj(images).view(b, -1, self.num_heads, head_dim).transpose(1, 2)
        v = self.v_proj(images).view(b, -1, self.num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, width))


def _block_case(width, heads, batch, text, images, seed, fresh=False, masked=False, dtype=torch.float64):
    def inputs():
        state = None if fresh else randomised(GatedCrossAttentionBlock(width, heads, 2), seed, dtype).state_dict()
        x = randn(batch, text, width, seed=seed + 1, dtype=dtype)
        pictures = randn(batch, images, width, seed=seed + 2, dtype=dtype)
        has_image = mask = None
        if masked:  # the first two text positions come before the image: no image for them
            has_image = torch.ones(batch, text, dtype=torch.bool)
            has_image[:, :2] = False
            mask = torch.ones(batch, 1, text, images, dtype=torch.bool)
        return width, heads, state, x, pictures, mask, has_image
    return inputs


def run_block(cls, width, num_heads, state, x, images, mask, has_image):
    torch.manual_seed(0)
    block = cls(width, num_heads, 2)
    if state is not None:
        block = load_weights(block, state, "GatedCrossAttentionBlock", "GatedCrossAttentionBlock")
    return block.to(x.dtype).eval()(x, images, mask, has_image)


register(Exercise(
    name="GatedCrossAttentionBlock", lesson=LESSON, reference=GatedCrossAttentionBlock, call=run_block,
    description="Flamingo's gated cross-attention block: tanh gates at 0, so the block starts as the identity",
    atol=1e-10, rtol=1e-10,
    cases=[
        Case("freshly built (gates at 0): the block returns its input exactly",
             _block_case(8, 2, 2, 5, 3, 101, fresh=True), atol=0, rtol=0),
        Case("trained gates, width 8, 2 heads, batch 2, 5 text tokens, 3 image tokens", _block_case(8, 2, 2, 5, 3, 102)),
        Case("trained gates, width 12, 3 heads, batch 1, 4 text tokens, 6 image tokens",
             _block_case(12, 3, 1, 4, 6, 103)),
        Case("trained gates, two text tokens before the image (has_image False there)",
             _block_case(8, 4, 2, 6, 3, 104, masked=True)),
    ],
    mutants=[
        Mutant("sigmoid_gates", _SigmoidGates,
               "sigmoid(0) = 0.5: the block would change the language model from the first step - Flamingo's gate "
               "is tanh(alpha) with alpha = 0, exactly 0 at the start"),
        Mutant("raw_gates", _RawGates, "the gate is tanh(alpha), not alpha itself: tanh keeps it in (-1, 1)"),
        Mutant("ungated_mlp", _UngatedMLP,
               "the feed-forward layer has its own tanh gate (mlp_gate): ungated, it changes the model at the start"),
        Mutant("gates_open_at_start", _GatesOpenAtStart,
               "initialise attn_gate and mlp_gate to zeros: the freshly built block must be the identity"),
        Mutant("ignores_has_image", _IgnoresHasImage,
               "positions with has_image False (text before the image) get no cross-attention: multiply the "
               "attention output by has_image"),
        Mutant("no_image_norm", _NoImageNorm,
               "normalise the image tokens (image_norm) before the key and value projections"),
    ],
))

# ----------------------------------------------------------------------------------------------
# image_prompt_string(rows, cols, image_seq_len): Idefics3's layout for one split image


def _run(n):
    return IMAGE_TOKEN * n


def prompt_no_row_newlines(rows, cols, image_seq_len):
    if rows == 0:
        return image_prompt_string(rows, cols, image_seq_len)
    grid = "".join(f"{FAKE_IMAGE_TOKEN}{row_col_token(r + 1, c + 1)}{_run(image_seq_len)}"
                   for r in range(rows) for c in range(cols))
    return f"{grid}\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"


def prompt_column_major(rows, cols, image_seq_len):
    if rows == 0:
        return image_prompt_string(rows, cols, image_seq_len)
    grid = "".join("".join(f"{FAKE_IMAGE_TOKEN}{row_col_token(r + 1, c + 1)}{_run(image_seq_len)}"
                           for r in range(rows)) + "\n" for c in range(cols))
    return f"{grid}\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"


def prompt_zero_based(rows, cols, image_seq_len):
    if rows == 0:
        return image_prompt_string(rows, cols, image_seq_len)
    grid = "".join("".join(f"{FAKE_IMAGE_TOKEN}{row_col_token(r, c)}{_run(image_seq_len)}" for c in range(cols)) + "\n"
                   for r in range(rows))
    return f"{grid}\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"


def prompt_global_first(rows, cols, image_seq_len):
    if rows == 0:
        return image_prompt_string(rows, cols, image_seq_len)
    global_view = f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"
    return global_view + "\n\n" + image_prompt_string(rows, cols, image_seq_len).split("\n\n")[0]


def prompt_no_blank_line(rows, cols, image_seq_len):
    return image_prompt_string(rows, cols, image_seq_len).replace("\n\n", "\n")


def prompt_global_unclosed(rows, cols, image_seq_len):
    return image_prompt_string(rows, cols, image_seq_len).removesuffix(FAKE_IMAGE_TOKEN)


def prompt_tiles_closed(rows, cols, image_seq_len):
    """Each tile wrapped on both sides; Idefics3 writes one <fake_token_around_image> before each tile and lets the
    next one close it."""
    if rows == 0:
        return image_prompt_string(rows, cols, image_seq_len)
    grid = "".join("".join(f"{FAKE_IMAGE_TOKEN}{row_col_token(r + 1, c + 1)}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"
                           for c in range(cols)) + "\n" for r in range(rows))
    return f"{grid}\n{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TAG}{_run(image_seq_len)}{FAKE_IMAGE_TOKEN}"


register(Exercise(
    name="image_prompt_string", lesson=LESSON, reference=image_prompt_string,
    description="the text a split image becomes in Idefics3's prompt: tile markers, image tokens, the global view",
    cases=[
        Case("2 x 2 tiles of 3 image tokens", lambda: (2, 2, 3)),
        Case("a wide image: 1 row x 3 tiles of 2 image tokens", lambda: (1, 3, 2)),
        Case("a tall image: 3 rows x 2 tiles of 1 image token", lambda: (3, 2, 1)),
        Case("not split (rows = cols = 0): the global view alone, 4 image tokens", lambda: (0, 0, 4)),
        Case("a grid of 2 rows and 0 columns cannot exist", lambda: (2, 0, 3), raises=ValueError),
    ],
    mutants=[
        Mutant("no_row_newlines", prompt_no_row_newlines, "end each row of tiles with a newline, as a line of text"),
        Mutant("column_major", prompt_column_major,
               "tiles go row by row: <row_1_col_1>, <row_1_col_2>, ..., then row 2"),
        Mutant("zero_based", prompt_zero_based, "rows and columns count from 1: the top-left tile is <row_1_col_1>"),
        Mutant("global_first", prompt_global_first, "the global view comes last, after a blank line"),
        Mutant("no_blank_line", prompt_no_blank_line,
               "a blank line separates the grid from the global view: the last row's newline, then another one"),
        Mutant("global_unclosed", prompt_global_unclosed,
               "the global view is closed by a last <fake_token_around_image>"),
        Mutant("tiles_closed", prompt_tiles_closed,
               "each tile starts with <fake_token_around_image> and is not closed: the next tile's opens it"),
    ],
))

