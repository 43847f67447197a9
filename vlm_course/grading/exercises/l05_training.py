"""Lesson 05, training with QLoRA: collate_batch, quantize_nf4, dequantize_nf4, LoRALinear, param_groups.

References are built on what the lesson checks against: the course processor's answer-only labels
(vlm_course.processing), bitsandbytes' NF4 (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`),
peft's LoRA layer (`peft.tuners.lora.Linear`) and the library's optimiser groups (`vlm_course.training`).
Mutants are the mistakes learners actually make; each must fail these checks (see the lesson's graded tests).

Why one file past 500 lines: it is lesson 05's grading, one file per lesson as the notebooks are: every
exercise's reference, cases, mutants and hints side by side, so a hint can be read next to the mistake it names.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from ..core import Case, Exercise, GradingError, Mutant
from ..inputs import randn, randomised
from ..registry import register

LESSON = "05"
IGNORE_INDEX = -100  # vlm_course.processing.IGNORE_INDEX (not imported: grading stays light)

# ----------------------------------------------------------------------------------------------
# collate_batch(sequences, assistant_header, im_end_id, pad_id) -> {"input_ids", "attention_mask", "labels"}
#
# sequences are ChatML token ids; labels keep every assistant answer AND its closing <|im_end|>, -100 elsewhere
# (system, user turns, image tokens, the "<|im_start|>assistant\n" header itself, the "\n" after <|im_end|>,
# padding). Right padding with pad_id; attention_mask 1 on real tokens.

# Token ids shaped like SmolLM2's: <|im_start|> 1, <|im_end|> 2, "assistant" 520, "\n" 198 (the header
# "<|im_start|>assistant\n" is [1, 520, 9531, 198] there; any list works).
IM_START, IM_END, NL = 1, 2, 198
HEADER = [IM_START, 520, 9531, NL]
USER = [IM_START, 4093, NL]
SYSTEM = [IM_START, 9690, NL]
IMAGE = 49152


def _answer_mask(seq: list[int], header: list[int], im_end: int, *, include_end=True, include_header=False,
                 last_only=False) -> list[bool]:
    """Which positions of one sequence are answer tokens (the reference rule, and its mutants)."""
    keep = [False] * len(seq)
    spans = []
    i, h = 0, len(header)
    while i <= len(seq) - h:
        if list(seq[i:i + h]) == list(header):
            start = i + h
            end = start
            while end < len(seq) and seq[end] != im_end:
                end += 1
            stop = min(end + 1, len(seq)) if include_end else end  # the <|im_end|> itself, when present
            spans.append((i if include_header else start, stop))
            i = end
        else:
            i += 1
    for start, stop in spans[-1:] if last_only else spans:
        for t in range(start, stop):
            keep[t] = True
    return keep


def _collate(sequences, assistant_header, im_end_id, pad_id, *, label_pad=IGNORE_INDEX, keep_prompt=False,
             left=False, shifted=False, **mask_options):
    seqs = [[int(t) for t in s] for s in sequences]
    if not seqs:
        raise ValueError("collate_batch needs at least one sequence")
    longest = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), longest), dtype=torch.long)
    labels = torch.full((len(seqs), longest), label_pad, dtype=torch.long)
    for b, seq in enumerate(seqs):
        n = len(seq)
        cols = slice(longest - n, longest) if left else slice(0, n)
        input_ids[b, cols] = torch.tensor(seq, dtype=torch.long)
        attention_mask[b, cols] = 1
        keep = [True] * n if keep_prompt else _answer_mask(seq, assistant_header, im_end_id, **mask_options)
        labels[b, cols] = torch.tensor([t if k else IGNORE_INDEX for t, k in zip(seq, keep)], dtype=torch.long)
    if shifted:  # labels[t] = the token at t + 1: the loss shifts again, so the model learns to skip a token
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_mask_all_ones(sequences, assistant_header, im_end_id, pad_id):
    out = _collate(sequences, assistant_header, im_end_id, pad_id)
    return {**out, "attention_mask": torch.ones_like(out["attention_mask"])}


def collate_newline_after_end_trained(sequences, assistant_header, im_end_id, pad_id):
    """The "\n" after each answer's <|im_end|> trained too (the answer read up to the next turn)."""
    out = _collate(sequences, assistant_header, im_end_id, pad_id)
    labels, ids = out["labels"].clone(), out["input_ids"]
    after_end = torch.zeros_like(labels, dtype=torch.bool)
    after_end[:, 1:] = (labels[:, :-1] == im_end_id) & (out["attention_mask"][:, 1:] == 1)
    labels[after_end] = ids[after_end]
    return {**out, "labels": labels}


def collate_batch(sequences, assistant_header, im_end_id, pad_id):
    """Reference: right-padded batch with answer-only labels (as VLMProcessor.encode_conversation + pad)."""
    return _collate(sequences, assistant_header, im_end_id, pad_id)


def run_collate(impl, sequences, header, im_end, pad):
    out = impl(sequences, header, im_end, pad)
    if not isinstance(out, dict) or not {"input_ids", "attention_mask", "labels"} <= set(out):
        got = sorted(out) if isinstance(out, dict) else type(out).__name__
        raise GradingError(f"collate_batch should return a dict with input_ids, attention_mask and labels, got {got}")
    return tuple(out[k] for k in ("input_ids", "attention_mask", "labels"))


def _turn(question: list[int], answer: list[int], first=False, image_tokens=0) -> list[int]:
    user = USER + [IMAGE] * (image_tokens if first else 0) + question + [IM_END, NL]
    return user + HEADER + answer + [IM_END, NL]


def _sequences(*conversations, system=False):
    out = []
    for turns in conversations:
        seq = SYSTEM + [7, 8, 9, IM_END, NL] if system else []
        for k, (q, a) in enumerate(turns):
            seq += _turn(q, a, first=k == 0, image_tokens=4)
        out.append(seq)
    return out


register(Exercise(
    name="collate_batch", lesson=LESSON, reference=collate_batch, call=run_collate,
    description="right-padded batch, labelled by lesson 04's make_labels (answers + their <|im_end|>)",
    uses=("make_labels",),
    cases=[
        Case("3 single-turn samples of different lengths, pad id 0",
             lambda: (_sequences([([11, 12, 13], [21, 22])], [([14], [23, 24, 25, 26])], [([15, 16], [27])]),
                      HEADER, IM_END, 0)),
        Case("a 2-turn conversation (both answers are trained) next to a 1-turn one, with a system prompt",
             lambda: (_sequences([([11, 12], [21, 22]), ([13], [23])], [([14, 15, 16, 17], [24])], system=True),
                      HEADER, IM_END, 0)),
        Case("pad id = <|im_end|> id, as SmolLM2's tokenizer has it (padding must still be -100 in labels)",
             lambda: (_sequences([([11], [21, 22, 23])], [([12, 13, 14, 15, 16], [24])]), HEADER, IM_END, IM_END)),
        Case("one sample: no padding at all", lambda: (_sequences([([11, 12], [21]), ([13], [22, 23])]),
                                                       HEADER, IM_END, 0)),
    ],
    mutants=[
        Mutant("keep_prompt", functools.partial(_collate, keep_prompt=True),
               "the labels keep the prompt (system, user, image tokens): set them to -100, so the loss counts "
               "only the assistant's answers"),
        Mutant("no_im_end", functools.partial(_collate, include_end=False),
               "the <|im_end|> after each answer is -100 - keep it in the labels, or the model never learns "
               "to stop talking"),
        Mutant("header_trained", functools.partial(_collate, include_header=True),
               "the '<|im_start|>assistant\\n' header is in the labels - it is part of the prompt (the model "
               "is given it at generation time): labels start right after it"),
        Mutant("last_turn_only", functools.partial(_collate, last_only=True),
               "only the last answer of a multi-turn conversation is trained - every assistant turn is an answer"),
        Mutant("pad_labels_with_pad_id", lambda s, h, e, p: _collate(s, h, e, p, label_pad=p),
               "padded label positions hold the pad id - they must be -100 (IGNORE_INDEX), or the model is "
               "trained to predict padding"),
        Mutant("pre_shifted", functools.partial(_collate, shifted=True),
               "the labels are shifted by one position - keep them aligned with input_ids (labels[t] = "
               "input_ids[t] on answer tokens): the loss does the shift (logits at t predict the token at t + 1)"),
        Mutant("left_padding", functools.partial(_collate, left=True),
               "the padding is on the left - pad training batches on the right (left padding is for generation)"),
        Mutant("mask_all_ones", collate_mask_all_ones,
               "attention_mask is 1 on the padding too - 1 on real tokens only, 0 on padding, so no token attends to it"),
        Mutant("newline_after_end_trained", collate_newline_after_end_trained,
               "the '\\n' after each answer's <|im_end|> is trained - an answer ends with its <|im_end|>; what "
               "follows belongs to the template"),
    ],
))

# ----------------------------------------------------------------------------------------------
# quantize_nf4(weight, block_size=64) -> (codes uint8 of weight's shape, absmax float32 (numel / block_size,))
# dequantize_nf4(codes, absmax, block_size=64) -> float32 weight
#
# References: bitsandbytes itself (CPU kernels), without double quantisation.

UNIFORM_LEVELS = torch.linspace(-1, 1, 16)


@functools.lru_cache(maxsize=1)
def nf4_levels() -> torch.Tensor:
    """The 16 NF4 levels, as bitsandbytes stores them (the QLoRA paper's NormalFloat4)."""
    import bitsandbytes.functional as bnbf

    return bnbf.get_4bit_type("nf4", device="cpu").float().clone()


def _check_blocks(weight: torch.Tensor, block_size: int) -> None:
    if weight.numel() % block_size:
        raise ValueError(f"{weight.numel()} weights are not a whole number of blocks of {block_size}")


def unpack_nibbles(packed: torch.Tensor, shape) -> torch.Tensor:
    """bitsandbytes packs two 4-bit codes per byte, the first in the high nibble."""
    flat = packed.reshape(-1)
    return torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(shape)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    flat = codes.reshape(-1).to(torch.uint8)
    return (flat[0::2] << 4 | flat[1::2]).reshape(-1, 1)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64):
    """Reference: bitsandbytes' NF4 quantisation (no double quantisation), codes unpacked to one per weight."""
    import bitsandbytes.functional as bnbf

    _check_blocks(weight, block_size)
    packed, state = bnbf.quantize_4bit(weight.detach().contiguous(), blocksize=block_size, quant_type="nf4",
                                       compress_statistics=False)
    return unpack_nibbles(packed, weight.shape), state.absmax.float()


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = 64) -> torch.Tensor:
    """Reference: bitsandbytes' NF4 dequantisation to float32."""
    import bitsandbytes.functional as bnbf
    from bitsandbytes.functional import QuantState

    _check_blocks(codes, block_size)
    state = QuantState(absmax=absmax.float(), shape=codes.shape, code=nf4_levels(), blocksize=block_size,
                       quant_type="nf4", dtype=torch.float32)
    return bnbf.dequantize_4bit(pack_nibbles(codes), state)


def _nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    return (x.unsqueeze(-1) - levels).abs().argmin(dim=-1).to(torch.uint8)


def _quantize_variant(weight, block_size=64, *, levels=None, per_tensor=False, scaled=True, signed_max=False,
                      codes_dtype=torch.uint8, absmax_in_weight_dtype=False, per_row=False, level_below=False):
    _check_blocks(weight, block_size)
    levels = nf4_levels() if levels is None else levels
    blocks = weight.detach().float().reshape(-1, block_size)
    if per_row:  # one scale per row of the matrix, repeated for each of its blocks
        rows = weight.detach().float().reshape(weight.shape[0], -1).abs().amax(dim=1)
        absmax = rows.repeat_interleave(blocks.shape[0] // weight.shape[0])
    elif per_tensor:
        absmax = blocks.abs().max().expand(blocks.shape[0]).clone()
    elif signed_max:
        absmax = blocks.amax(dim=1)
    else:
        absmax = blocks.abs().amax(dim=1)
    x = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None] if scaled else blocks
    if level_below:  # the largest level <= x (bucketize), not the nearest
        codes = (torch.bucketize(x, levels, right=True) - 1).clamp(0, 15).to(torch.uint8).reshape(weight.shape)
    else:
        codes = _nearest(x, levels).reshape(weight.shape)
    codes = codes.to(codes_dtype)
    return codes, absmax.to(weight.dtype) if absmax_in_weight_dtype else absmax


def _dequantize_variant(codes, absmax, block_size=64, *, levels=None, scale=True, tiled=False, divide=False,
                        per_row=False):
    _check_blocks(codes, block_size)
    levels = nf4_levels() if levels is None else levels
    values = levels[codes.long()].reshape(-1)
    if not scale:
        return values.reshape(codes.shape)
    if divide:
        return (values / absmax.float().repeat_interleave(block_size)).reshape(codes.shape)
    if per_row:  # absmax read as one value per row of the matrix
        rows = absmax.float()[: codes.shape[0]].repeat_interleave(codes.shape[1])
        return (values * rows).reshape(codes.shape)
    per_weight = absmax.float().repeat(block_size) if tiled else absmax.float().repeat_interleave(block_size)
    return (values * per_weight).reshape(codes.shape)


def _weight(shape, seed, dtype=torch.float32, scale=0.02, zero_block=False):
    def inputs():
        w = randn(*shape, seed=seed, scale=scale)
        w[0, 3] = 5 * scale  # an outlier: its block's scale is set by it, not by the bulk of the weights
        if zero_block:
            w.reshape(-1)[:64] = 0  # a block of zeros (dead or pruned weights) must not divide by zero
        return w.to(dtype)
    return inputs


def _weight_case(shape, seed, block_size, **kw):
    make = _weight(shape, seed, **kw)
    return lambda: (make(), block_size)


register(Exercise(
    name="quantize_nf4", lesson=LESSON, reference=quantize_nf4, atol=0.0, rtol=0.0,
    description="blockwise NF4: one absmax per block, nearest of the 16 NF4 levels -> (codes, absmax)",
    cases=[
        Case("a 64x128 weight (std 0.02, one outlier), blocks of 64", _weight_case((64, 128), 51, 64)),
        Case("a 32x256 weight, blocks of 128 (8 blocks per row)", _weight_case((32, 256), 52, 128)),
        Case("a bfloat16 16x64 weight with one all-zero block, blocks of 64",
             _weight_case((16, 64), 53, 64, dtype=torch.bfloat16, zero_block=True)),
        Case("a 12x64 weight, blocks of 32", _weight_case((12, 64), 54, 32)),
        Case("a 10x30 weight: 300 weights are not whole blocks of 64", _weight_case((10, 30), 55, 64),
             raises=ValueError),
    ],
    mutants=[
        Mutant("per_tensor_absmax", functools.partial(_quantize_variant, per_tensor=True),
               "one absmax for the whole tensor - NF4 is blockwise: each block of block_size consecutive weights "
               "gets its own absmax, so one outlier only coarsens its own block"),
        Mutant("unscaled_nearest", functools.partial(_quantize_variant, scaled=False),
               "the nearest level was chosen for the raw weights - divide each block by its absmax first "
               "(levels live in [-1, 1])"),
        Mutant("uniform_levels", functools.partial(_quantize_variant, levels=UNIFORM_LEVELS),
               "these codes index 16 evenly spaced levels (int4) - NF4's levels are quantiles of a normal "
               "distribution: use NF4_LEVELS"),
        Mutant("signed_max", functools.partial(_quantize_variant, signed_max=True),
               "the block scale is the largest weight, not the largest |weight| - use .abs().amax()"),
        Mutant("int64_codes", functools.partial(_quantize_variant, codes_dtype=torch.int64),
               "the codes are int64 (argmin's dtype) - return them as torch.uint8: a code is 4 bits"),
        Mutant("absmax_in_weight_dtype", functools.partial(_quantize_variant, absmax_in_weight_dtype=True),
               "absmax has the weight's dtype - keep the block scales in float32 whatever the weight's dtype "
               "(bitsandbytes does): compute them on weight.float()"),
        Mutant("per_row_absmax", functools.partial(_quantize_variant, per_row=True),
               "one absmax per row of the matrix - NF4 takes one per block of block_size consecutive weights "
               "(weight.reshape(-1, block_size)), whatever the row length"),
        Mutant("level_below", functools.partial(_quantize_variant, level_below=True),
               "each weight went to the level just below it - take the *nearest* level: argmin of |x - level|"),
    ],
))


def _codes_case(shape, seed, block_size):
    make = _weight(shape, seed)
    return lambda: (*quantize_nf4(make(), block_size), block_size)


register(Exercise(
    name="dequantize_nf4", lesson=LESSON, reference=dequantize_nf4, atol=0.0, rtol=0.0,
    description="NF4 codes and per-block absmax -> float32 weight (bit-exact with bitsandbytes)",
    cases=[
        Case("codes of a 64x128 weight, blocks of 64", _codes_case((64, 128), 61, 64)),
        Case("codes of a 32x256 weight, blocks of 128", _codes_case((32, 256), 62, 128)),
        Case("codes of a 6x64 weight, blocks of 32", _codes_case((6, 64), 63, 32)),
    ],
    mutants=[
        Mutant("no_scale", functools.partial(_dequantize_variant, scale=False),
               "the levels were not multiplied by their block's absmax"),
        Mutant("tiled_absmax", functools.partial(_dequantize_variant, tiled=True),
               "absmax was tiled (repeat) instead of stretched (repeat_interleave): weight i belongs to block "
               "i // block_size"),
        Mutant("uniform_levels", functools.partial(_dequantize_variant, levels=UNIFORM_LEVELS),
               "codes were read as 16 evenly spaced levels - they index NF4_LEVELS"),
        Mutant("divided_by_absmax", functools.partial(_dequantize_variant, divide=True),
               "the levels were divided by absmax - quantising divided by it, so dequantising multiplies"),
        Mutant("per_row_absmax", functools.partial(_dequantize_variant, per_row=True),
               "absmax was read as one value per row - it holds one per block of block_size consecutive weights: "
               "weight i uses absmax[i // block_size]"),
    ],
))

# ----------------------------------------------------------------------------------------------
# LoRALinear(base, r, alpha, dropout=0.0): y = base(x) + (alpha / r) * lora_B(lora_A(dropout(x))), base frozen,
# lora_A an nn.Linear(in, r, bias=False) with a random init, lora_B an nn.Linear(r, out, bias=False) at zero.


class PeftLoRALinear(nn.Module):
    """Reference: peft's own LoRA layer, exposing the attribute names the lesson asks for."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        from peft import LoraConfig
        from peft.tuners.lora import Linear as PeftLinear

        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout)
        self.layer = PeftLinear(base, adapter_name="default", config=config, r=r, lora_alpha=alpha,
                                lora_dropout=dropout)
        base.requires_grad_(False)  # peft's model wrapper freezes the base; the bare layer does not

    @property
    def base(self) -> nn.Module:
        return self.layer.base_layer

    @property
    def lora_A(self) -> nn.Linear:
        return self.layer.lora_A["default"]

    @property
    def lora_B(self) -> nn.Linear:
        return self.layer.lora_B["default"]

    def forward(self, x):
        return self.layer(x)


class _LoRAVariant(nn.Module):
    """Wrong LoRA layers, by flag."""

    scale_by_alpha = b_random = a_zero = unfrozen = dropout_on_output = scale_inverted = base_bias_dropped = False

    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        if not self.unfrozen:
            base.requires_grad_(False)
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)
        if self.a_zero:
            nn.init.zeros_(self.lora_A.weight)
        if not self.b_random:
            nn.init.zeros_(self.lora_B.weight)
        self.scaling = alpha if self.scale_by_alpha else r / alpha if self.scale_inverted else alpha / r
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        base = nn.functional.linear(x, self.base.weight) if self.base_bias_dropped else self.base(x)
        if self.dropout_on_output:
            return base + self.dropout(self.lora_B(self.lora_A(x))) * self.scaling
        return base + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def _lora_mutant(**flags):
    return type("LoRAMutant", (_LoRAVariant,), flags)


def _lora_case(d_in, d_out, r, alpha, dropout, seed, bias=True, train=False):
    def inputs():
        torch.manual_seed(seed)
        base = randomised(nn.Linear(d_in, d_out, bias=bias), seed)
        x = randn(3, 5, d_in, seed=seed + 1)
        a = randn(r, d_in, seed=seed + 2, scale=d_in**-0.5)
        b = randn(d_out, r, seed=seed + 3, scale=0.5)
        return base, r, alpha, dropout, x, a, b, train
    return inputs


def run_lora(cls, base, r, alpha, dropout, x, a, b, train):
    """Build the layer; return (output at init, trainable count, gradient flags, output with given A and B).

    The init output must equal base(x) (B = 0), the gradient must reach lora_B at step 0 (A random) and
    never the base, and with the same A and B the output must equal peft's.
    """
    torch.manual_seed(1234)  # the layer's own init draws: any random A is fine, the checks do not depend on it
    layer = cls(base, r, alpha, dropout) if dropout else cls(base, r, alpha)
    if not isinstance(layer, nn.Module):
        raise GradingError(f"LoRALinear(...) should build an nn.Module, got {type(layer).__name__}")
    for attr in ("base", "lora_A", "lora_B"):
        if not isinstance(getattr(layer, attr, None), nn.Module):
            raise GradingError(f"LoRALinear needs a submodule `{attr}` (base, lora_A = nn.Linear(in, r, bias=False), "
                               "lora_B = nn.Linear(r, out, bias=False)), so that weights can be compared and copied")
    if layer.lora_A.weight.shape != (r, base.in_features) or layer.lora_B.weight.shape != (base.out_features, r):
        raise GradingError(f"lora_A.weight should be {(r, base.in_features)} and lora_B.weight "
                           f"{(base.out_features, r)}, got {tuple(layer.lora_A.weight.shape)} and "
                           f"{tuple(layer.lora_B.weight.shape)}")
    layer.train(train)
    torch.manual_seed(99)
    y_init = layer(x)
    y_init.square().mean().backward()
    trainable = sum(p.numel() for p in layer.parameters() if p.requires_grad)
    b_grad = layer.lora_B.weight.grad
    grads = (b_grad is not None and bool(b_grad.abs().sum() > 0),
             any(p.grad is not None for p in layer.base.parameters()))
    with torch.no_grad():
        layer.lora_A.weight.copy_(a)
        layer.lora_B.weight.copy_(b)
    torch.manual_seed(99)
    y = layer(x)
    return y_init.detach(), trainable, grads, y.detach()


register(Exercise(
    name="LoRALinear", lesson=LESSON, reference=PeftLoRALinear, call=run_lora,
    description="frozen base + (alpha / r) * B A x, B zero at init; equals peft's LoRA layer",
    cases=[
        Case("base 16 -> 12 with bias, r 4, alpha 8 (scaling 2)", _lora_case(16, 12, 4, 8, 0.0, 71)),
        Case("base 24 -> 40 without bias, r 2, alpha 16 (scaling 8)", _lora_case(24, 40, 2, 16, 0.0, 72, bias=False)),
        Case("r 8, alpha 8, dropout 0.1 in eval mode (dropout is off)", _lora_case(32, 16, 8, 8, 0.1, 73)),
        Case("r 4, alpha 4, dropout 0.5 in train mode (seeded): dropout applies to the adapter's input only",
             _lora_case(16, 20, 4, 4, 0.5, 74, train=True)),
    ],
    mutants=[
        Mutant("scale_by_alpha", _lora_mutant(scale_by_alpha=True),
               "the adapter is scaled by alpha - scale it by alpha / r (so changing r does not change the "
               "update's size)"),
        Mutant("b_random", _lora_mutant(b_random=True),
               "the output changes at initialisation: lora_B must start at zero, so that the wrapped layer "
               "first computes exactly what the pretrained one did"),
        Mutant("a_zero", _lora_mutant(a_zero=True),
               "no gradient reaches lora_B at step 0: with A and B both zero every gradient is zero and nothing "
               "ever trains - initialise lora_A randomly (nn.Linear's Kaiming init does) and only B at zero"),
        Mutant("base_not_frozen", _lora_mutant(unfrozen=True),
               "the base layer still trains: freeze it (base.requires_grad_(False)) - only lora_A and lora_B "
               "are trainable"),
        Mutant("dropout_on_output", _lora_mutant(dropout_on_output=True),
               "dropout is applied to the adapter's output - peft applies it to the adapter's input: "
               "lora_B(lora_A(dropout(x)))"),
        Mutant("scale_inverted", _lora_mutant(scale_inverted=True),
               "the adapter is scaled by r / alpha - the scaling is alpha / r"),
        Mutant("base_bias_dropped", _lora_mutant(base_bias_dropped=True),
               "the base layer's bias is missing (F.linear(x, base.weight)) - call the base layer itself: self.base(x)"),
    ],
))

# ----------------------------------------------------------------------------------------------
# param_groups(model, lrs, weight_decay=0.01) -> AdamW groups: each trainable parameter exactly once, with its
# component's lr (lrs["lora"] for LoRA adapters when given), and weight decay only on matrices (ndim >= 2).


def _reference_groups(model, lrs, weight_decay=0.01, *, decay_rule=None, lr_rule=None, include_frozen=False):
    decay_rule = decay_rule or (lambda name, p: p.ndim >= 2)
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad and not include_frozen:
            continue
        lr = lr_rule(name, lrs) if lr_rule else _lr_of(name, lrs)
        wd = weight_decay if decay_rule(name, p) else 0.0
        groups.setdefault((lr, wd), {"params": [], "lr": lr, "weight_decay": wd})["params"].append(p)
    return list(groups.values())


def _lr_of(name: str, lrs: dict) -> float:
    if "lora_" in name and "lora" in lrs:
        return lrs["lora"]
    return lrs[name.split(".", 1)[0]]


def param_groups(model, lrs, weight_decay=0.01):
    """Reference (vlm_course.training.param_groups applies the same rules to a TrainConfig)."""
    return _reference_groups(model, lrs, weight_decay)


def _backbone_lr(name, lrs):
    return lrs["lora"] if "lora_" in name and "lora" in lrs else lrs["decoder" if name.startswith("projector") else
                                                                      name.split(".", 1)[0]]


def _tiny_vlm(seed: int):
    from ...config import DecoderConfig, ProjectorConfig, VisionConfig, VLMConfig
    from ...vlm import VisionLanguageModel

    torch.manual_seed(seed)
    cfg = VLMConfig(vision=VisionConfig(image_size=16, patch_size=4, hidden_size=16, intermediate_size=32,
                                        num_layers=1, num_heads=2),
                    projector=ProjectorConfig(shuffle_factor=2),
                    decoder=DecoderConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
                                          num_heads=2, num_kv_heads=1, max_position_embeddings=64))
    return VisionLanguageModel(cfg)


def _groups_case(recipe: str, seed: int, lrs: dict, weight_decay=0.01):
    def inputs():
        model = _tiny_vlm(seed)
        model.requires_grad_(True)
        if recipe == "frozen_vision":
            model.vision.requires_grad_(False)
        elif recipe == "lora":
            from peft import LoraConfig, inject_adapter_in_model

            model.requires_grad_(False)
            inject_adapter_in_model(LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]), model.decoder)
            for name, p in model.decoder.named_parameters():
                p.requires_grad_("lora_" in name)
            model.projector.requires_grad_(True)
        return model, dict(lrs), weight_decay
    return inputs


def run_groups(impl, model, lrs, weight_decay):
    """Every trainable parameter's (name, lr, weight decay), as the learner's groups assign them."""
    groups = impl(model, lrs, weight_decay)
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise GradingError("param_groups should return a list of dicts, each with 'params', 'lr' and 'weight_decay'")
    names = {id(p): n for n, p in model.named_parameters()}
    assigned = []
    for g in groups:
        if "lr" not in g or "weight_decay" not in g:
            raise GradingError("every group needs its own 'lr' and 'weight_decay' keys (AdamW's defaults would apply "
                               "silently otherwise)")
        for p in g["params"]:
            if id(p) not in names:
                raise GradingError("a group holds a tensor that is not one of the model's parameters")
            assigned.append((names[id(p)], float(g["lr"]), float(g["weight_decay"])))
    try:
        torch.optim.AdamW([dict(g) for g in groups])
    except (ValueError, TypeError) as err:
        raise GradingError(f"torch.optim.AdamW refuses these groups: {err}") from None
    return sorted(f"{n}: lr {lr:g}, weight_decay {wd:g}" for n, lr, wd in assigned)


NANO_LRS = {"vision": 1e-4, "projector": 2e-3, "decoder": 1e-4}

register(Exercise(
    name="param_groups", lesson=LESSON, reference=param_groups, call=run_groups,
    description="AdamW groups: lr per component, no weight decay on norms and biases, frozen weights left out",
    cases=[
        Case("everything trainable, nanoVLM's lrs (projector 2e-3, backbones 1e-4)",
             _groups_case("full", 81, NANO_LRS)),
        Case("vision frozen, decoder lr 3e-5, weight decay 0.1",
             _groups_case("frozen_vision", 82, {"vision": 1e-4, "projector": 1e-3, "decoder": 3e-5}, 0.1)),
        Case("LoRA adapters on the decoder (lrs['lora'] = 2e-4), projector trainable, the rest frozen",
             _groups_case("lora", 83, {**NANO_LRS, "lora": 2e-4})),
    ],
    mutants=[
        Mutant("decay_everything", functools.partial(_reference_groups, decay_rule=lambda n, p: True),
               "weight decay is applied to norm weights and biases - decay only matrices (p.ndim >= 2); pulling a "
               "norm's scale toward 0 fights the normalisation"),
        Mutant("decay_biases", functools.partial(_reference_groups, decay_rule=lambda n, p: "norm" not in n),
               "biases are decayed - only matrices (p.ndim >= 2) get weight decay, biases and norm scales none"),
        Mutant("projector_backbone_lr", functools.partial(_reference_groups, lr_rule=_backbone_lr),
               "the projector got the backbones' learning rate - it starts from random weights and needs its own, "
               "larger one (nanoVLM: 2e-3 vs 1e-4)"),
        Mutant("frozen_included", functools.partial(_reference_groups, include_frozen=True),
               "frozen parameters (requires_grad=False) are in the groups - leave them out: AdamW would keep "
               "state for them, and weight decay would change them"),
        Mutant("lora_component_lr", functools.partial(_reference_groups, lr_rule=lambda n, lrs: lrs[n.split(".")[0]]),
               "LoRA adapters got their component's lr - when lrs has a 'lora' entry, every lora_A / lora_B "
               "parameter uses it"),
        Mutant("decay_by_name", functools.partial(_reference_groups, decay_rule=lambda n, p: n.endswith("weight")),
               "weight decay was chosen by name ('...weight'), which includes the norms' weights - decide by shape: "
               "decay only matrices, p.ndim >= 2"),
        Mutant("one_lr", functools.partial(_reference_groups, lr_rule=lambda n, lrs: max(lrs.values())),
               "every parameter got the same lr - each component (the first part of the parameter's name: "
               "vision, projector, decoder) has its own entry in lrs"),
    ],
))
