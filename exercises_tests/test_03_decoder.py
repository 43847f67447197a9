"""Lesson 03, the decoder: rms_norm, rope_cos_sin, apply_rope, grouped_query_attention, swiglu, KVCache,
sampling_probs.

The checks, their seeded inputs and the known mistakes they recognise live in
vlm_course/grading/exercises/l03_decoder.py (the same checks the notebook's check cells run).
"""

import pytest
import torch
from grading_helpers import assert_exercise_passes, explained, learner_object, lesson_exercises, run_learner

from vlm_course.config import DecoderConfig
from vlm_course.decoder import Decoder, generate, sample_next_token
from vlm_course.grading.inputs import randomised

NOTEBOOK = "03_decoder.ipynb"

# SmolLM2's grouping (9 query heads, 3 KV heads: ratio 3, odd head count) at a tiny width.
CFG = DecoderConfig(vocab_size=97, hidden_size=72, intermediate_size=40, num_layers=2, num_heads=9, num_kv_heads=3,
                    rope_theta=500.0, max_position_embeddings=64)


def _heads(t, n):
    """(B, T, n * head_dim) -> (B, n, T, head_dim)"""
    return t.view(t.shape[0], t.shape[1], n, CFG.head_dim).transpose(1, 2)


def _forward(decoder, ids, cache):
    return decoder(ids, kv_cache=cache).logits


@pytest.mark.parametrize("exercise", lesson_exercises("03"))
def test_decoder(notebook, exercise):
    assert_exercise_passes(notebook, exercise)


@explained("rms_norm", "rope_cos_sin", "apply_rope", "grouped_query_attention", "swiglu")
def test_decoder_end_to_end(notebook):
    """Your rms_norm, rope_cos_sin, apply_rope, grouped_query_attention and swiglu, assembled into a whole
    decoder, reproduce vlm_course's Decoder logits (9 query / 3 KV heads, batch 2, random weights)."""
    rms_norm, rope_cos_sin, apply_rope, gqa, swiglu = (learner_object(notebook, n) for n in (
        "rms_norm", "rope_cos_sin", "apply_rope", "grouped_query_attention", "swiglu"))
    decoder = randomised(Decoder(CFG), seed=31)
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(32))
    with torch.no_grad():
        expected = decoder(ids).logits
        x = decoder.embed_tokens(ids)
        cos, sin = run_learner("rope_cos_sin", rope_cos_sin, torch.arange(11).expand(2, -1), CFG.head_dim,
                               CFG.rope_theta)
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            h = run_learner(f"rms_norm (layer {i})", rms_norm, x, layer.input_layernorm.weight, CFG.rms_norm_eps)

            q = run_learner("apply_rope on queries", apply_rope, _heads(attn.q_proj(h), CFG.num_heads), cos, sin)
            k = run_learner("apply_rope on keys", apply_rope, _heads(attn.k_proj(h), CFG.num_kv_heads), cos, sin)
            out = run_learner(f"grouped_query_attention (layer {i})", gqa, q, k, _heads(attn.v_proj(h), CFG.num_kv_heads))
            x = x + attn.o_proj(out.transpose(1, 2).reshape(2, 11, -1))
            h = run_learner(f"rms_norm (layer {i})", rms_norm, x, layer.post_attention_layernorm.weight, CFG.rms_norm_eps)
            x = x + run_learner(f"swiglu (layer {i})", swiglu, h, layer.mlp)
        logits = decoder.lm_head(run_learner("the final rms_norm", rms_norm, x, decoder.norm.weight, CFG.rms_norm_eps))
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4,
                               msg=lambda m: f"your assembled decoder differs from vlm_course's Decoder: {m}")


@explained("KVCache", "sampling_probs")
def test_generation_with_your_cache_and_sampling(notebook):
    """Token-by-token generation through your KVCache, picking tokens with your sampling_probs, gives exactly
    the library's tokens: greedy, and sampled with the same random generator (temperature, top-k, top-p)."""
    KVCache, sampling_probs = learner_object(notebook, "KVCache"), learner_object(notebook, "sampling_probs")
    decoder = randomised(Decoder(CFG), seed=33)
    prompt = torch.randint(0, CFG.vocab_size, (3, 6), generator=torch.Generator().manual_seed(34))
    settings = [dict(temperature=0.0), dict(temperature=0.9, top_k=20, top_p=0.8)]
    for setting in settings:
        expected = generate(decoder, prompt, max_new_tokens=8, generator=torch.Generator().manual_seed(35), **setting)
        cache = run_learner("KVCache(num_layers)", KVCache, CFG.num_layers)
        generator, step, tokens = torch.Generator().manual_seed(35), prompt, []
        with torch.no_grad():
            for n in range(8):
                logits = run_learner(f"the decoder with your KVCache (step {n})", _forward, decoder, step, cache)
                probs = run_learner(f"sampling_probs({setting})", sampling_probs, logits[:, -1],
                                    setting["temperature"], setting.get("top_k"), setting.get("top_p"))
                step = torch.multinomial(probs, 1, generator=generator)  # what sample_next_token draws
                tokens.append(step[:, 0])
        assert torch.equal(torch.stack(tokens, 1), expected), (
            f"with {setting}, generating through your KVCache and sampling_probs gave different tokens from "
            f"vlm_course's generate (which uses {sample_next_token.__name__} and its own KVCache)")
