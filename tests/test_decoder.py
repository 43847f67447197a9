"""Decoder: parity with transformers' LlamaForCausalLM (tiny random configs and the real SmolLM2-135M),
KV cache equivalence, sampling."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from vlm_course.decoder import Decoder, KVCache, sample_next_token

# Tiny configs: fp32 with identical operation order; 1e-5 absolute covers kernel-level summation differences.
ATOL_TINY = 1e-5
# Real SmolLM2 (30 layers, logits up to ~40): differences could accumulate through depth; 1e-4 absolute is
# still far below anything that changes a token. Measured: 0.0 on this machine (same kernels, same order).
ATOL_REAL = 1e-4

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4, hidden_size=32),  # GQA ratio 1
    "gqa3": dict(num_attention_heads=9, num_key_value_heads=3, hidden_size=72),  # ratio 3, odd heads (as SmolLM2)
    "mqa_odd": dict(num_attention_heads=5, num_key_value_heads=1, hidden_size=40),  # ratio 5
    "head_dim": dict(num_attention_heads=3, num_key_value_heads=3, hidden_size=48, head_dim=24),  # head_dim != D/H
}


def tiny_llama(tmp_path, tie=False, theta=10000.0, **kw):
    cfg = LlamaConfig(vocab_size=101, intermediate_size=64, num_hidden_layers=2, max_position_embeddings=128,
                      rope_theta=theta, tie_word_embeddings=tie, **kw)
    ref = LlamaForCausalLM(cfg).eval()
    ref.save_pretrained(tmp_path)
    return ref, Decoder.from_llama(tmp_path)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("tie", [False, True])
def test_logits_parity(tmp_path, name, tie):
    ref, ours = tiny_llama(tmp_path, tie=tie, theta=500.0, **CONFIGS[name])
    ids = torch.randint(0, 101, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, ref(ids).logits, atol=ATOL_TINY, rtol=0)


def test_left_padded_batch_parity(tmp_path):
    ref, ours = tiny_llama(tmp_path, **CONFIGS["gqa3"])
    ids = torch.randint(0, 101, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, :5] = 0
    mask[1, :1] = 0
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=ATOL_TINY, rtol=0)
    # A left-padded row gives the same logits as the same tokens unpadded.
    with torch.no_grad():
        alone = ours(ids[0:1, 5:]).logits
    torch.testing.assert_close(got[0, 5:], alone[0], atol=ATOL_TINY, rtol=0)


def test_cached_forward_equals_full_forward(tmp_path):
    _, ours = tiny_llama(tmp_path, **CONFIGS["gqa3"])
    ids = torch.randint(0, 101, (2, 10))
    with torch.no_grad():
        full = ours(ids).logits
        cache = KVCache(len(ours.layers))
        prefix = ours(ids[:, :6], kv_cache=cache).logits
        step = ours(ids[:, 6:7], kv_cache=cache).logits
        chunk = ours(ids[:, 7:], kv_cache=cache).logits  # several tokens on top of a cache
    torch.testing.assert_close(torch.cat([prefix, step, chunk], 1), full, atol=ATOL_TINY, rtol=0)
    assert cache.seq_len == 10


def test_greedy_generate_matches_transformers_with_padding(tmp_path):
    ref, ours = tiny_llama(tmp_path, **CONFIGS["gqa3"])
    ids = torch.randint(3, 101, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :3] = 0
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)[:, 9:]
    with_cache = ours.generate(ids, attention_mask=mask, max_new_tokens=12)
    without_cache = ours.generate(ids, attention_mask=mask, max_new_tokens=12, use_cache=False)
    assert torch.equal(with_cache, expected)
    assert torch.equal(without_cache, with_cache)


def test_generate_stops_at_eos_and_pads(tmp_path):
    _, ours = tiny_llama(tmp_path, **CONFIGS["mha"])
    ids = torch.randint(3, 101, (2, 5))
    free = ours.generate(ids, max_new_tokens=8)
    eos = int(free[0, 2])  # pretend the third token of row 0 is "end of sequence"
    out = ours.generate(ids, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out[0, :3], free[0, :3])
    assert (out[0, 3:] == 0).all(), "tokens after eos must be padding"
    if not (free[1] == eos).any():
        assert torch.equal(out[1], free[1])


def test_context_overflow_is_explained(tmp_path):
    _, ours = tiny_llama(tmp_path, **CONFIGS["mha"])
    with pytest.raises(ValueError, match="context"):
        ours(torch.zeros(1, 129, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        ours.generate(torch.zeros(1, 100, dtype=torch.long), max_new_tokens=40)


# ----------------------------------------------------------------------------------------------
# Sampling


def test_sampling_greedy_at_zero_temperature():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))


def test_top_k_only_samples_the_k_best():
    logits = torch.randn(2, 50)
    allowed = torch.topk(logits, 3).indices
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        token = sample_next_token(logits, temperature=2.0, top_k=3, generator=g)
        assert all(token[i] in allowed[i] for i in range(2))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    seen = {int(sample_next_token(logits, temperature=1.0, top_p=0.75, generator=g)) for _ in range(300)}
    assert seen == {0, 1}  # 0.5 < 0.75, 0.5 + 0.3 >= 0.75: the nucleus is the two best tokens
    seen = {int(sample_next_token(logits, temperature=1.0, top_p=0.4, generator=g)) for _ in range(100)}
    assert seen == {0}  # the best token always stays


def test_temperature_sharpens_and_flattens():
    logits = torch.tensor([[2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    cold = (sample_next_token(logits, temperature=0.3, generator=g) == 0).float().mean()
    warm = (sample_next_token(logits, temperature=3.0, generator=g) == 0).float().mean()
    expected_warm = torch.softmax(torch.tensor([2.0, 1.0, 0.0]) / 3.0, 0)[0]
    assert cold > 0.9
    assert abs(warm - expected_warm) < 0.03


# ----------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct, offline


@pytest.mark.slow
def test_real_smollm2_logits_parity(smollm2, smollm2_reference):
    decoder, tokenizer = smollm2
    assert decoder.cfg.num_layers == 30 and decoder.cfg.num_kv_heads == 3 and decoder.cfg.vocab_size == 49152
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Vision-language models", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(decoder(ids.input_ids).logits, smollm2_reference(ids.input_ids).logits,
                                   atol=ATOL_REAL, rtol=0)


def chat_ids(tokenizer, question):
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                         return_dict=True)["input_ids"]


@pytest.mark.slow
def test_real_smollm2_answers_paris_like_transformers(smollm2, smollm2_reference):
    decoder, tokenizer = smollm2
    ids = chat_ids(tokenizer, "What is the capital of France?")
    ours = decoder.generate(ids, max_new_tokens=20, eos_token_id=tokenizer.eos_token_id)
    # An explicit all-ones mask: without one, transformers may infer it from `ids != pad_token_id`, and
    # SmolLM2's pad token (<|im_end|>) occurs inside the chat prompt.
    theirs = smollm2_reference.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                        do_sample=False, eos_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
    assert torch.equal(ours, theirs)
    assert "Paris" in tokenizer.decode(ours[0], skip_special_tokens=True)


@pytest.mark.slow
def test_real_smollm2_cache_equals_no_cache(smollm2):
    decoder, tokenizer = smollm2
    ids = chat_ids(tokenizer, "Name three colours.")
    assert torch.equal(decoder.generate(ids, max_new_tokens=24),
                       decoder.generate(ids, max_new_tokens=24, use_cache=False))


def test_logits_to_keep_gives_the_last_positions_of_the_full_logits_and_feeds_the_head_a_contiguous_tensor(tmp_path):
    # The head must see a contiguous (B, n, D) tensor: a strided x[:, -1:] under bf16 made PyTorch broadcast and copy
    # the whole vocabulary-wide head once per sample (2.8 GB for a batch of 50 with SmolLM2's 49152 words).
    from vlm_course.decoder import last_positions

    _, ours = tiny_llama(tmp_path, tie=True)
    ids = torch.randint(0, 101, (3, 7))
    seen = []
    ours.lm_head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        full = ours(input_ids=ids).logits
        for n in (1, 3):
            torch.testing.assert_close(ours(input_ids=ids, logits_to_keep=n).logits, full[:, -n:])
    assert seen == [True, True, True]
    x = torch.randn(2, 5, 4)
    assert last_positions(x, 0) is x and torch.equal(last_positions(x, 2), x[:, -2:])
