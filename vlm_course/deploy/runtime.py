"""The runtime shipped in every bundle (templates/run.py), loaded from here: what we test is what runs on the Jetson.

run.py needs numpy, onnxruntime and tokenizers only (no torch, no vlm_course), so it is a template file copied
into the bundle rather than a module of this package; `load_runtime` imports that very file.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"


@functools.cache
def load_runtime():
    """templates/run.py as a module: VLMRunner, verify_bundle, BundleError, PromptBuilder, ..."""
    spec = importlib.util.spec_from_file_location("vlm_bundle_run", TEMPLATES / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
