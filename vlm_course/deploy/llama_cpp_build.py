"""Build llama.cpp's multimodal command-line tool once per machine, from a PyPI source distribution.

`python vlm_course/deploy/llama_cpp_build.py` (what `make setup` runs) fetches llama-cpp-python's sdist with pip
(it vendors a whole llama.cpp tree under vendor/llama.cpp/, with convert_hf_to_gguf.py and gguf-py), and builds
only the two programs the course uses, on the CPU:

    llama-mtmd-cli   runs a text GGUF + an mmproj GGUF on a picture and a question (tools/mtmd/mtmd-cli.cpp)
    llama-quantize   rewrites a GGUF in another type, e.g. 4-bit Q4_K_M (tools/quantize/)

Everything lands in <cache>/llama.cpp-<version>/ (cache: VLM_COURSE_CACHE, default ~/.cache/vlm_course), outside
the repository; a second run finds the stamp file there and returns at once. Point VLM_COURSE_LLAMA_CPP at another
build's folder (one holding bin/llama-mtmd-cli and the source tree's convert_hf_to_gguf.py under src/) to use it.

Why an sdist: pip is the one client this course's machines reach, and this sdist pins one llama.cpp tree that the
conversion script, its gguf-py and the CLI all come from, so the GGUF files the script writes are the ones the
CLI reads. Why not `pip install llama-cpp-python`: its wheel builds the shared libraries but not the CLI tools.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
TARGETS = ("llama-mtmd-cli", "llama-quantize")
# CPU only, static, no tests/examples/server/network: the smallest build that gives the two tools.
# LLAMA_OPENSSL defaults to ON in this tree; the tools read local files, so no libssl headers are needed.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_COMMON=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
)


@dataclass(frozen=True)
class LlamaCpp:
    """Where one build of llama.cpp lives: its source tree (for the converter) and its programs."""

    root: Path

    @property
    def source(self) -> Path:
        return self.root / "src"

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def mtmd_cli(self) -> Path:
        return self.bin / "llama-mtmd-cli"

    @property
    def quantize(self) -> Path:
        return self.bin / "llama-quantize"

    @property
    def converter(self) -> Path:
        return self.source / "convert_hf_to_gguf.py"

    @property
    def stamp(self) -> Path:
        return self.root / "build.json"

    def is_built(self) -> bool:
        return self.mtmd_cli.exists() and self.converter.exists() and self.stamp.exists()

    def build_info(self) -> dict:
        return json.loads(self.stamp.read_text()) if self.stamp.exists() else {}


def cache_dir() -> Path:
    # weight_files.cache_dir's rule, repeated so that `make setup` can run this file without importing the
    # package (and torch with it): a second run then takes a fraction of a second (tests check both agree)
    return Path(os.environ.get("VLM_COURSE_CACHE", Path.home() / ".cache" / "vlm_course"))


def default_location() -> LlamaCpp:
    override = os.environ.get("VLM_COURSE_LLAMA_CPP")
    return LlamaCpp(Path(override) if override else cache_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}")


def find_llama_cpp() -> LlamaCpp:
    """The built llama.cpp, or a FileNotFoundError that says how to build it."""
    where = default_location()
    if not where.is_built():
        raise FileNotFoundError(
            f"llama.cpp is not built in {where.root} (no {where.mtmd_cli.name} or {where.stamp.name}): run "
            "`make setup` or `nice -n 10 .venv/bin/python -m vlm_course.deploy.llama_cpp_build` (~10-20 min once "
            "on 2 cores), or point VLM_COURSE_LLAMA_CPP at a folder holding bin/llama-mtmd-cli and src/")
    return where


def _tool(name: str) -> str:
    """cmake / ninja from the virtual environment (the dev extra installs both) before the system's."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found: pip install -e '.[dev]' installs it (or apt-get install {name})")
    return found


def _run(command: list[str], **kwargs) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True, **kwargs)


def fetch_source(where: LlamaCpp, version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """Download the sdist with pip (no build, no dependencies) and unpack its vendor/llama.cpp as where.source."""
    if where.converter.exists():
        return where.source
    download = where.root / "sdist"
    download.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={version}", "-d", str(download)])
    archive = download / f"llama_cpp_python-{version}.tar.gz"
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    unpacked = where.root / "src.partial"
    shutil.rmtree(unpacked, ignore_errors=True)
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            if member.name.startswith(prefix) and (member.isfile() or member.isdir()):
                member.name = member.name[len(prefix):]
                members.append(member)
        tar.extractall(unpacked, members=members, filter="data")
    unpacked.rename(where.source)  # only a complete tree gets the final name
    archive.unlink()  # 77 MB; the unpacked tree is what is used
    return where.source


def build(where: LlamaCpp | None = None, jobs: int = 2, nice: int = 10) -> LlamaCpp:
    """Fetch and build llama.cpp's CPU tools into `where` (default: the cache); a no-op when already built."""
    where = where or default_location()
    if where.is_built():
        print(f"llama.cpp already built in {where.root} ({where.build_info().get('build_seconds', '?')} s build)")
        return where
    started = time.monotonic()
    fetch_source(where)
    build_dir = where.root / "build"
    # `nice -n` adds to the niceness we already have: raise it only up to `nice`, so `nice -n 10 make setup`
    # compiles at 10, not 20
    extra = max(0, nice - os.nice(0))
    niceness = ["nice", "-n", str(extra)] if shutil.which("nice") and extra else []
    _run(niceness + [_tool("cmake"), "-S", str(where.source), "-B", str(build_dir), "-G", "Ninja",
                     f"-DCMAKE_MAKE_PROGRAM={_tool('ninja')}", *CMAKE_OPTIONS])
    _run(niceness + [_tool("cmake"), "--build", str(build_dir), "--target", *TARGETS, "-j", str(jobs)])
    where.bin.mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, where.bin / target)
    seconds = round(time.monotonic() - started)
    where.stamp.write_text(json.dumps({"llama_cpp_python": LLAMA_CPP_PYTHON_VERSION, "targets": list(TARGETS),
                                       "cmake_options": list(CMAKE_OPTIONS), "jobs": jobs,
                                       "cpu_count": os.cpu_count(), "build_seconds": seconds}, indent=1))
    shutil.rmtree(build_dir)  # object files: ~hundreds of MB the tools no longer need
    print(f"built {', '.join(TARGETS)} in {seconds} s into {where.bin}")
    return where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_course.deploy.llama_cpp_build", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    parser.add_argument("--nice", type=int, default=10, help="run the compiler under `nice -n N` (0: off)")
    args = parser.parse_args(argv)
    try:
        build(jobs=args.jobs, nice=args.nice)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        print(f"llama.cpp build failed: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
