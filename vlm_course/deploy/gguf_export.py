"""Write the decoder as a GGUF file, the format llama.cpp (and ollama, LM Studio, ...) runs.

A GGUF file is a header of key/value metadata (architecture, sizes, the whole tokenizer, the chat
template) followed by named tensors. Our decoder is a Llama, so we write llama.cpp's `llama`
architecture with its tensor names:

    embed_tokens                  -> token_embd.weight
    layers.i.input_layernorm      -> blk.i.attn_norm.weight
    layers.i.self_attn.{q,k,v,o}  -> blk.i.attn_{q,k,v,output}.weight
    layers.i.post_attention_layernorm -> blk.i.ffn_norm.weight
    layers.i.mlp.{gate,up,down}   -> blk.i.ffn_{gate,up,down}.weight
    norm                          -> output_norm.weight
    lm_head                       -> output.weight (left out when tied: readers then reuse token_embd)

One trap: RoPE pairs dimensions differently. Our decoder (like transformers) rotates dimension i together
with i + d/2 ("rotate half"); llama.cpp's llama rope rotates neighbours (2i, 2i + 1). llama.cpp's
convert_hf_to_gguf.py therefore permutes the rows of every head of q_proj and k_proj so that its pairs
line up, and transformers' GGUF reader un-permutes them. We apply the same permutation, so both readers
get our weights back exactly (the round-trip check below proves it).

The vision encoder and projector are not in this file: llama.cpp runs images through a separate
"mmproj" GGUF. In the bundle the ONNX image encoder plays that role.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..decoder import Decoder

DTYPES = ("f32", "f16")


def permute_for_llama_cpp(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder each head's rows from (first half, second half) to interleaved pairs (convert_hf_to_gguf's).

    Row j of a head (j < d/2) is paired with row j + d/2 by rotate-half RoPE; after the permutation they sit
    at rows 2j and 2j + 1, where llama.cpp's rope expects a pair.
    """
    out_features = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, out_features // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def gguf_tensors(decoder: Decoder, dtype: str = "f32") -> dict[str, np.ndarray]:
    """Our decoder's weights under llama.cpp's names and layout. 2-D weights in `dtype`; norms stay f32."""
    if dtype not in DTYPES:
        raise ValueError(f"GGUF dtype must be one of {DTYPES}, got {dtype!r}")
    cfg = decoder.cfg
    matrix_dtype = np.float16 if dtype == "f16" else np.float32
    state = {k: v.detach().float().cpu().numpy() for k, v in decoder.state_dict().items()}
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    if not cfg.tie_word_embeddings:
        names["lm_head.weight"] = "output.weight"
    per_layer = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg.num_layers):
        names.update(
            {f"layers.{i}.{ours}.weight": f"blk.{i}.{theirs}.weight" for ours, theirs in per_layer.items()}
        )
    tensors = {}
    for ours, theirs in names.items():
        weight = state[ours]
        if theirs.endswith("attn_q.weight"):
            weight = permute_for_llama_cpp(weight, cfg.num_heads)
        elif theirs.endswith("attn_k.weight"):
            weight = permute_for_llama_cpp(weight, cfg.num_kv_heads)
        # llama.cpp keeps 1-D tensors (norm weights) in f32 whatever the file type.
        tensors[theirs] = np.ascontiguousarray(
            weight.astype(matrix_dtype if weight.ndim == 2 else np.float32)
        )
    return tensors


# ----------------------------------------------------------------------------------------------
# Tokenizer metadata


def tokenizer_metadata(tokenizer, vocab_size: int) -> dict:
    """tokens, token types, merges and special ids of a transformers BPE tokenizer, llama.cpp's 'gpt2' model.

    Tokens beyond the decoder's vocabulary (the VLM's '<image>' placeholder, which the decoder never looks up
    in its embedding table) are left out: llama.cpp needs one embedding row per token.
    """
    import gguf

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ValueError(
            f"only byte-level BPE tokenizers are supported (SmolLM2's), got {backend['model']['type']}"
        )
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    special = {t["id"] for t in backend.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in backend.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:  # a padded embedding table: rows with no token
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i])
        types.append(
            gguf.TokenType.CONTROL
            if i in special
            else gguf.TokenType.USER_DEFINED
            if i in added
            else gguf.TokenType.NORMAL
        )
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    ids = {
        name: tokenizer.convert_tokens_to_ids(getattr(tokenizer, name)) if getattr(tokenizer, name) else None
        for name in ("bos_token", "eos_token", "unk_token", "pad_token")
    }
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "ids": ids,
        "chat_template": getattr(tokenizer, "chat_template", None),
    }


# ----------------------------------------------------------------------------------------------
# Writing


def export_gguf(
    decoder: Decoder, tokenizer, path, dtype: str = "f16", name: str = "vlm-course-decoder"
) -> Path:
    """Write `decoder` (+ its tokenizer and chat template) as a llama-architecture GGUF file, atomically."""
    import gguf

    cfg = decoder.cfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = gguf_tensors(decoder, dtype)  # validates dtype before anything is written
    tok = tokenizer_metadata(tokenizer, cfg.vocab_size)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "llama")
    writer.add_name(name)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)

    writer.add_tokenizer_model("gpt2")  # byte-level BPE
    writer.add_tokenizer_pre("smollm")  # llama.cpp's name for SmolLM2's pre-tokenizer regex
    writer.add_token_list(tok["tokens"])
    writer.add_token_types(tok["types"])
    writer.add_token_merges(tok["merges"])
    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("unk_token", writer.add_unk_token_id),
        ("pad_token", writer.add_pad_token_id),
    ):
        if tok["ids"][key] is not None:
            add(tok["ids"][key])
    writer.add_add_bos_token(False)  # SmolLM2's chat template writes <|im_start|> itself
    writer.add_add_space_prefix(False)
    if tok["chat_template"]:
        writer.add_chat_template(tok["chat_template"])

    for tensor_name, array in tensors.items():
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


# ----------------------------------------------------------------------------------------------
# Round trip: read the file back with transformers and compare logits


@dataclass
class GGUFRoundTrip:
    dtype: str
    max_abs_logits: float  # transformers(GGUF) vs our decoder with the same (rounded) weights
    max_abs_vs_fp32: float  # transformers(GGUF) vs our fp32 decoder: includes the f16 rounding
    weights_equal: bool  # every tensor read back equals ours (after the file's rounding)
    tokenizer_equal: (
        bool | None
    )  # the tokenizer read back encodes a probe text and chat prompt as ours (None: unchecked)
    logits_scale: float  # max |logit| of our model on the probe, to judge the differences against


def load_gguf_with_transformers(path):
    """LlamaForCausalLM as transformers reads a GGUF file (it dequantises to float32)."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def tokenizer_round_trips(tokenizer, path, text: str) -> bool:
    """Does the tokenizer transformers rebuilds from the GGUF metadata encode text and chat prompt as ours?"""
    from transformers import AutoTokenizer

    path = Path(path)
    theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    messages = [{"role": "user", "content": "What is in the picture?"}]
    return theirs(text, add_special_tokens=False)["input_ids"] == tokenizer(text, add_special_tokens=False)[
        "input_ids"
    ] and theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False
    ) == tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


@torch.no_grad()
def check_gguf_roundtrip(
    decoder: Decoder,
    tokenizer,
    path,
    dtype: str,
    check_tokenizer: bool = True,
    text: str = "The capital of France is Paris. 1 + 1 = 2.",
) -> GGUFRoundTrip:
    """Read the GGUF file back with transformers and compare weights, logits and tokenizer with ours."""
    from ..decoder import llama_name_map

    theirs = load_gguf_with_transformers(path)
    decoder = decoder.float().eval()
    rounded = Decoder(decoder.cfg).eval()  # ours with the weights rounded as the file stores them
    rounded.load_state_dict(
        {
            k: (v.half().float() if dtype == "f16" and v.dim() == 2 else v)
            for k, v in decoder.state_dict().items()
        }
    )
    their_state = theirs.state_dict()
    our_state = rounded.state_dict()
    weights_equal = all(
        torch.equal(our_state[ours], their_state["model." + hf])
        for ours, hf in llama_name_map(decoder.cfg.num_layers).items()
    )

    tokenizer_equal = tokenizer_round_trips(tokenizer, path, text) if check_tokenizer else None
    input_ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    their_logits = theirs(input_ids=input_ids).logits
    ours_fp32 = decoder(input_ids=input_ids).logits
    return GGUFRoundTrip(
        dtype=dtype,
        max_abs_logits=float((their_logits - rounded(input_ids=input_ids).logits).abs().max()),
        max_abs_vs_fp32=float((their_logits - ours_fp32).abs().max()),
        weights_equal=weights_equal,
        tokenizer_equal=tokenizer_equal,
        logits_scale=float(ours_fp32.abs().max()),
    )
