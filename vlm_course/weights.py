"""Pretrained weights by name: the real SmolLM2-135M-Instruct as a course Decoder, and where weight files come from.

    load_smollm2()                    (our Decoder, its tokenizer), online or offline
    resolve(name) -> folder           a local folder, the course cache, the hub, or an offline fallback
    assets_dir(), cache_dir(), is_offline(), ...

The finding of files lives in weight_files.py, which knows no model class: the model files (vision.py,
decoder.py, vlm.py) load themselves through it (`VisionEncoder.from_siglip`, `Decoder.from_llama`,
`VisionLanguageModel.from_idefics3`). This module sits above them, so that a lesson can write
`from vlm_course.weights import load_smollm2, resolve` and get both halves from one place.
"""

from __future__ import annotations

import torch

from .decoder import Decoder, decoder_config_from_hf
from .vision import vision_config_from_hf
from .weight_files import (
    COURSE_VIT_SMOL,
    SMOLLM2_INSTRUCT,
    WeightsNotFoundError,
    apply_offline_env,
    assets_dir,
    cache_dir,
    cache_dir_problem,
    cache_slot,
    gguf_path,
    is_checkpoint_dir,
    is_offline,
    package_root,
    resolve,
    tokenizer_problem,
    unreadable_safetensors,
)

__all__ = [
    "COURSE_VIT_SMOL", "SMOLLM2_INSTRUCT", "WeightsNotFoundError", "apply_offline_env", "assets_dir", "cache_dir",
    "cache_dir_problem", "cache_slot", "decoder_config_from_hf", "gguf_path", "is_checkpoint_dir", "is_offline",
    "load_smollm2", "package_root", "resolve", "tokenizer_problem", "unreadable_safetensors", "vision_config_from_hf",
]


def load_smollm2(name: str = SMOLLM2_INSTRUCT, dtype: torch.dtype = torch.float32):
    """The real SmolLM2-135M-Instruct as (our Decoder, its tokenizer). Offline-capable (see weight_files.py)."""
    from transformers import AutoTokenizer

    folder = resolve(name)
    return Decoder.from_llama(folder, dtype=dtype), AutoTokenizer.from_pretrained(folder)
