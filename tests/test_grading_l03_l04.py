"""The references of lessons 03 and 04's exercises agree with the library they stand for.

(tests/test_grading.py's meta-test already proves, for every registered exercise, that the reference passes
and every mutant fails with its own hint; this file checks the references themselves.)
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from vlm_course.config import DecoderConfig, get_profile
from vlm_course.decoder import RMSNorm, sample_next_token
from vlm_course.grading import check, get_exercise, grade
from vlm_course.grading.exercises import l03_decoder as l03
from vlm_course.grading.exercises import l04_assembling as l04
from vlm_course.processing import VLMProcessor


def test_rms_norm_reference_is_the_library_module():
    norm = RMSNorm(12, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 4, 12)
    torch.testing.assert_close(l03.rms_norm(x, norm.weight, norm.eps), norm(x), atol=0, rtol=0)


def test_gqa_reference_equals_the_library_attention_path():
    """The reference's explicit mask equals build_attention_mask + SDPA as used inside Attention (with and
    without a cache offset)."""
    from vlm_course.decoder import build_attention_mask, repeat_kv

    for q_len, kv_len in [(5, 5), (3, 8), (1, 6)]:
        q, k, v = torch.randn(2, 6, q_len, 8), torch.randn(2, 2, kv_len, 8), torch.randn(2, 2, kv_len, 8)
        mask = build_attention_mask(torch.ones(1, kv_len, dtype=torch.long), q_len, kv_len - q_len)
        expected = torch.nn.functional.scaled_dot_product_attention(
            q, repeat_kv(k, 3), repeat_kv(v, 3), attn_mask=mask, is_causal=mask is None and q_len > 1)
        torch.testing.assert_close(l03.grouped_query_attention(q, k, v), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("setting", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                                     dict(temperature=1.3, top_p=0.8), dict(temperature=0.8, top_k=6, top_p=0.6)])
def test_sampling_probs_is_what_sample_next_token_draws_from(setting):
    """Drawing from the reference's probabilities with a seeded generator gives exactly sample_next_token's
    tokens, and filtered tokens are never drawn."""
    logits = torch.randn(4, 30) * 3
    probs = l03.sampling_probs(logits, setting["temperature"], setting.get("top_k"), setting.get("top_p"))
    torch.testing.assert_close(probs.sum(-1), torch.ones(4))
    for seed in range(5):
        expected = sample_next_token(logits, generator=torch.Generator().manual_seed(seed), **setting)
        if setting["temperature"] > 0:
            drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed)).squeeze(-1)
        else:
            drawn = probs.argmax(-1)
        assert torch.equal(drawn, expected)


def test_kv_cache_exercise_runs_the_library_cache_like_a_full_forward():
    """The KVCache check's step-by-step logits (with the library's cache) equal one full forward pass."""
    decoder, ids, schedule = l03._cache_case(2, [4, 1, 3], 7)()
    with torch.no_grad():
        full = decoder(ids).logits
    torch.testing.assert_close(l03.run_cache(l03.KVCache, decoder, ids, schedule), full, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def processor():
    return VLMProcessor.from_config(get_profile("tiny").config)


def test_make_labels_reference_equals_the_processor_labels(processor):
    red, blue = Image.new("RGB", (64, 64), "red"), Image.new("RGB", (64, 64), "blue")
    header, end = l04.header_and_end()
    batch = processor([red, [red, blue], []], ["What colour?", "Compare them.", "Hi"],
                      ["Red.", "Red, then blue.", "Hello! How can I help?"])
    assert torch.equal(l04.make_labels(batch["input_ids"], header, end), batch["labels"])
    turns = [{"user": "Colour?", "assistant": "Blue."}, {"user": "Sure?", "assistant": "Yes, blue."}]
    sample = processor.encode_conversation(turns, [blue])
    assert torch.equal(l04.make_labels(sample["input_ids"][None], header, end)[0], sample["labels"])


def test_kv_cache_errors_are_explained(capsys):
    class Broken(l03.KVCache):
        def update(self, layer, k, v):
            raise IndexError("boom")

    check("KVCache", Broken)
    out = capsys.readouterr().out
    assert out.startswith("❌ KVCache: update(layer=0, k, v) with 0 cached + 5 new tokens") and "IndexError: boom" in out


def test_unfinished_rotate_half_is_named():
    def apply_rope(x, cos, sin):
        raise NotImplementedError("rotate_half is not implemented yet")

    report = grade(get_exercise("apply_rope"), apply_rope)
    assert report.status == "not_implemented" and "rotate_half" in report.message


def test_decoder_config_of_the_cache_check_is_smollm2_grouping():
    cfg: DecoderConfig = l03._CACHE_CFG
    assert (cfg.num_heads, cfg.num_kv_heads) == (9, 3)
