"""The course model in llama.cpp: a text GGUF and an mmproj GGUF, run by llama.cpp's multimodal CLI.

    saved Idefics3 folder --convert_hf_to_gguf.py----------> text-<type>.gguf    (the SmolLM2 decoder, type llama)
    (model.save_idefics3)  --convert_hf_to_gguf.py --mmproj-> mmproj-<type>.gguf  (ViT + pixel shuffle + linear, clip)
    llama-mtmd-cli -m text.gguf --mmproj mmproj.gguf --image picture.png -p question --temp 0  -> answer + timings

Both files come from llama.cpp's own converter (the copy beside the CLI, built by `llama_cpp_build`), so the
course writes no GGUF by hand here; `gguf_export.py` is the hand-written text-only path.

The prompt llama.cpp builds. For an Idefics3 mmproj, llama.cpp (tools/mtmd/mtmd.cpp, mtmd-image.cpp) resizes
every picture to the mmproj's longest edge (the encoder's size, as save_idefics3 sets it), cuts it into a grid
of tiles and always adds an overview, even when the grid is a single tile. One image becomes

    <fake_token_around_image><row_1_col_1> <image> x N  \\n\\n<fake_token_around_image><global-img> <image> x N
    <fake_token_around_image>

(the tile, then the overview: 2N image positions), where transformers and the course's image_layout="idefics3"
write only the overview part. `LlamaCppLayout` is the course processor with llama.cpp's layout, so that
`vlm_course.vlm.answer` with it reads exactly the prompt llama.cpp reads: that is how the PyTorch and llama.cpp
answers are compared (`compare_answers`). For a square picture of the encoder's size (the mini-cauldron's 64 px)
no side resizes, so both sides also see the same pixels; other sizes are resized by each side's own bicubic.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..processing import FAKE_IMAGE_TOKEN, VLMProcessor
from .budget import decode_roofline
from .llama_cpp_build import LlamaCpp, find_llama_cpp

OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # what convert_hf_to_gguf.py writes itself
RESPONSE_MARKER = "<<<vlm_course answer>>>"  # mtmd-cli prints $MTMD_TEST_RESPONSE_MARKER before each answer


# ----------------------------------------------------------------------------------------------
# Conversion


@dataclass(frozen=True)
class GgufPair:
    """The two files llama.cpp runs: the text model and the mmproj (vision tower + projector)."""

    text: Path
    mmproj: Path
    outtype: str

    def sizes_mb(self) -> tuple[float, float]:
        return self.text.stat().st_size / 1e6, self.mmproj.stat().st_size / 1e6


def _converter_env(llama: LlamaCpp) -> dict:
    # The script puts its own gguf-py first on sys.path (unless NO_LOCAL_GGUF is set), so it writes with the
    # gguf that matches the CLI, not the venv's; its model classes live in conversion/ beside it.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(llama.source), os.environ.get("PYTHONPATH", "")]))
    env.pop("NO_LOCAL_GGUF", None)
    return env


def _start_converter(llama: LlamaCpp, folder: Path, outfile: Path, outtype: str, mmproj: bool) -> subprocess.Popen:
    command = [sys.executable, str(llama.converter), str(folder), "--outfile", str(outfile), "--outtype", outtype]
    command += ["--mmproj"] if mmproj else []
    return subprocess.Popen(command, env=_converter_env(llama), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish_converter(process: subprocess.Popen, folder: Path, outfile: Path, what: str) -> Path:
    log, _ = process.communicate()
    if process.returncode != 0:
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"convert_hf_to_gguf.py failed on {folder} ({what}):\n{tail}")
    if not outfile.exists():  # we pass the exact --outfile; check the script wrote it there
        raise RuntimeError(f"convert_hf_to_gguf.py reported success but wrote no {outfile}")
    return outfile


def convert_idefics3(folder, out_dir, outtype: str = "f16", llama: LlamaCpp | None = None) -> GgufPair:
    """A saved Idefics3 folder (`VisionLanguageModel.save_idefics3`) -> text-<outtype>.gguf + mmproj-<outtype>.gguf.

    outtype: one the converter writes (f32, f16, bf16, q8_0); 4-bit types come from `quantize_text`. The two
    conversions run side by side (two processes: most of each is starting Python and reading the checkpoint).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r}: convert_hf_to_gguf.py writes {OUTTYPES}; for 4-bit use "
                         "quantize_text(pair, 'Q4_0') on an f16 pair")
    folder, out_dir = Path(folder), Path(out_dir)
    config = folder / "config.json"
    if not config.exists() or '"idefics3"' not in config.read_text():
        raise ValueError(f"{folder} is not a saved Idefics3 checkpoint (no config.json with model_type "
                         "'idefics3'): write one with model.save_idefics3(folder)")
    llama = llama or find_llama_cpp()
    out_dir.mkdir(parents=True, exist_ok=True)
    text, mmproj = out_dir / f"text-{outtype}.gguf", out_dir / f"mmproj-{outtype}.gguf"
    running = [(_start_converter(llama, folder, text, outtype, mmproj=False), text, "text model"),
               (_start_converter(llama, folder, mmproj, outtype, mmproj=True), mmproj, "mmproj")]
    try:
        for process, outfile, what in running:
            _finish_converter(process, folder, outfile, what)
    finally:  # one failed: do not leave the other running
        for process, _, _ in running:
            if process.poll() is None:
                process.kill()
                process.wait()
    return GgufPair(text, mmproj, outtype)


def quantize_text(pair: GgufPair, qtype: str = "Q4_0", llama: LlamaCpp | None = None, threads: int = 1) -> GgufPair:
    """The text model rewritten by llama-quantize (e.g. Q4_0, Q4_K_M); the mmproj stays as it is.

    llama.cpp quantises the vision side only in its own f16/q8_0 (the converter's types), so the pair keeps the
    mmproj of `pair`. Q4_K types need rows that are a multiple of 256; SmolLM2's 576-wide rows are not, and
    llama-quantize then falls back to another type for them (it prints which).
    """
    llama = llama or find_llama_cpp()
    out = pair.text.with_name(f"text-{qtype.lower()}.gguf")
    done = subprocess.run([str(llama.quantize), str(pair.text), str(out), qtype, str(threads)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-10:])
        raise RuntimeError(f"llama-quantize {qtype} failed:\n{tail}")
    return GgufPair(out, pair.mmproj, qtype.lower())


# ----------------------------------------------------------------------------------------------
# Running llama-mtmd-cli


@dataclass
class MtmdTimings:
    """What llama-mtmd-cli prints about one single-turn run, in milliseconds."""

    image_encode_ms: float  # the vision tower + projector on every tile ("mtmd batch encoding done in")
    prompt_ms: float  # the decoder over the prompt: text and image positions ("prompt eval time")
    prompt_tokens: int
    decode_ms: float  # every generated token after the first ("eval time")
    decode_tokens: int
    load_ms: float  # reading the model files ("load time")

    @property
    def time_to_first_token_ms(self) -> float:
        """Image encoding + prompt: what a user waits before the first word (model loading excluded)."""
        return self.image_encode_ms + self.prompt_ms

    @property
    def decode_tokens_per_s(self) -> float:
        return 1000 * self.decode_tokens / self.decode_ms if self.decode_ms > 0 else float("nan")


@dataclass
class MtmdRun:
    answer: str
    timings: MtmdTimings | None
    log: str = field(repr=False, default="")


def _mtmd_command(llama: LlamaCpp, pair: GgufPair, max_new_tokens: int, threads: int, context: int) -> list[str]:
    # --jinja: the chat template saved in the GGUF (the course's, with its system prompt) rendered as a template;
    # without it llama.cpp recognises "ChatML" and writes its built-in version, which has no system turn.
    # --temp 0: greedy (llama.cpp's sampler picks the arg-max); -c: a context that fits the prompt and answer,
    # not SmolLM2's 8192 (whose KV cache would only cost memory); no GPU layers on this build.
    return [str(llama.mtmd_cli), "-m", str(pair.text), "--mmproj", str(pair.mmproj), "--jinja", "--temp", "0",
            "-n", str(max_new_tokens), "-t", str(threads), "-c", str(context), "--no-mmproj-offload", "-ngl", "0"]


def parse_timings(log: str) -> MtmdTimings | None:
    """The numbers of llama_perf_context_print and mtmd's encoder line, or None when the log has none."""

    def number(pattern: str) -> re.Match | None:
        return re.search(pattern, log)

    prompt = number(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
    decode = number(r"\s eval time =\s*([\d.]+) ms /\s*(\d+) runs")
    load = number(r"load time =\s*([\d.]+) ms")
    encodes = [float(m) for m in re.findall(r"mtmd batch encoding done in (\d+) ms", log)]
    if not (prompt and decode):
        return None
    return MtmdTimings(image_encode_ms=sum(encodes), prompt_ms=float(prompt[1]), prompt_tokens=int(prompt[2]),
                       decode_ms=float(decode[1]), decode_tokens=int(decode[2]),
                       load_ms=float(load[1]) if load else float("nan"))


def _save_picture(image, folder: Path, index: int) -> Path:
    """A picture as a PNG the CLI can open (lossless, so both sides read the same pixels)."""
    from ..processing import open_image, to_rgb

    if isinstance(image, (str, Path)):
        return Path(image)
    path = folder / f"picture-{index:04d}.png"
    to_rgb(open_image(image)).save(path)
    return path


def run_mtmd(pair: GgufPair, image, question: str, max_new_tokens: int = 16, threads: int = 1,
             context: int = 1024, llama: LlamaCpp | None = None, extra_args=()) -> MtmdRun:
    """One question about one picture, in a fresh llama-mtmd-cli process (so its timings are this run's; `-lv 4`
    lets libllama's timing lines through the CLI's log filter). extra_args go to the CLI as they are (e.g.
    ["--ignore-eos"] to time a fixed number of tokens)."""
    llama = llama or find_llama_cpp()
    with tempfile.TemporaryDirectory(prefix="mtmd-") as tmp:
        picture = _save_picture(image, Path(tmp), 0)
        command = _mtmd_command(llama, pair, max_new_tokens, threads, context) + ["--image", str(picture),
                                                                                   "-p", question, "-lv", "4",
                                                                                   *extra_args]
        done = subprocess.run(command, capture_output=True, text=True,
                              env=dict(os.environ, MTMD_TEST_RESPONSE_MARKER=RESPONSE_MARKER))
    log = done.stdout + done.stderr
    if done.returncode != 0:
        raise RuntimeError(f"llama-mtmd-cli failed ({done.returncode}):\n" + "\n".join(log.splitlines()[-15:]))
    return MtmdRun(_answers_from_stdout(done.stdout, 1)[0], parse_timings(done.stderr), log)


def _answers_from_stdout(stdout: str, expected: int) -> list[str]:
    """The text after each response marker (the CLI prints the answer after it, then blank lines)."""
    pieces = stdout.split(RESPONSE_MARKER)[1:]
    if len(pieces) != expected:
        raise RuntimeError(f"llama-mtmd-cli printed {len(pieces)} answers, expected {expected}:\n{stdout[-2000:]}")
    return [piece.strip() for piece in pieces]


def answer_many(pair: GgufPair, images, questions, max_new_tokens: int = 16, threads: int = 1,
                context: int = 1024, llama: LlamaCpp | None = None) -> list[str]:
    """`run_mtmd` for each (image, question): one CLI process each, as a user would run it.

    (The CLI's chat mode, fed on stdin with /image and /clear, would load the model once; but its console echoes
    the input lines, and on a pipe the echo lands in the middle of the answers on stdout.)
    """
    if len(images) != len(questions):
        raise ValueError(f"got {len(images)} images for {len(questions)} questions")
    llama = llama or find_llama_cpp()
    return [run_mtmd(pair, image, question, max_new_tokens, threads, context, llama).answer
            for image, question in zip(images, questions)]


# ----------------------------------------------------------------------------------------------
# The PyTorch side, reading llama.cpp's prompt


class LlamaCppLayout(VLMProcessor):
    """The course processor with the image layout llama.cpp builds for an Idefics3 mmproj: a 1 x 1 grid tile
    (<fake_token_around_image><row_1_col_1>, N image tokens), then "\\n\\n" and the overview (the course's
    idefics3 block). The picture is encoded twice, tile first, as llama.cpp does; with the mmproj's longest edge
    at the encoder's size (save_idefics3's setting) the grid is always one tile and tile == overview."""

    def image_block_ids(self) -> list[int]:
        if self.config.image_layout != "idefics3":
            raise ValueError("LlamaCppLayout is for image_layout='idefics3' models (llama.cpp runs Idefics3 saves)")
        overview = super().image_block_ids()  # <fake><global-img> <image> x N <fake>
        tile = self.text_ids(FAKE_IMAGE_TOKEN + "<row_1_col_1>") + [self.image_token_id] * self.tokens_per_image
        double_newline = self.tokenizer.convert_tokens_to_ids("ĊĊ")  # llama.cpp looks "\n\n" up as one token
        return tile + [double_newline] + overview

    def preprocess_images(self, images):
        pixels = super().preprocess_images(images)
        return pixels.repeat_interleave(2, dim=0)  # tile, overview for each picture


def torch_answers(model, images, questions, max_new_tokens: int = 16, processor: VLMProcessor | None = None):
    """`vlm.answer`, one question at a time (no padding), on the prompt llama.cpp builds."""
    from ..vlm import answer

    processor = processor or LlamaCppLayout.from_config(model.config)
    return [answer(model, processor, image, question, max_new_tokens=max_new_tokens)
            for image, question in zip(images, questions)]


# ----------------------------------------------------------------------------------------------
# Agreement and speed


@dataclass
class Agreement:
    subset: str
    outtype: str
    same: int
    total: int
    examples: list[tuple[str, str, str]] = field(default_factory=list, repr=False)  # (question, torch, llama)

    @property
    def rate(self) -> float:
        return self.same / self.total if self.total else float("nan")


def compare_answers(folder, pairs: list[GgufPair], rows, max_new_tokens: int = 16, model=None,
                    llama: LlamaCpp | None = None) -> list[Agreement]:
    """Greedy answers of PyTorch (`vlm.answer` on llama.cpp's prompt, once) and of llama-mtmd-cli with each pair
    on the same rows (the_cauldron's schema: first image, first question), counted equal per subset (`source`)
    and pair. `folder` is the saved Idefics3 checkpoint the pairs were converted from (or pass its `model`)."""
    from ..vlm import VisionLanguageModel

    model = model or VisionLanguageModel.from_idefics3(folder)
    images = [row["images"][0] for row in rows]
    questions = [row["texts"][0]["user"] for row in rows]
    subsets = [(row.get("source") or row["texts"][0].get("source", "?")).removeprefix("synthetic-") for row in rows]
    ours = torch_answers(model, images, questions, max_new_tokens)
    results = []
    for pair in pairs:
        theirs = answer_many(pair, images, questions, max_new_tokens, llama=llama)
        by_subset: dict[str, Agreement] = {}
        for name, question, a, b in zip(subsets, questions, ours, theirs):
            entry = by_subset.setdefault(name, Agreement(name, pair.outtype, 0, 0))
            entry.total += 1
            entry.same += a.strip() == b.strip()
            entry.examples.append((question, a.strip(), b.strip()))
        results += by_subset.values()
    return results


@dataclass
class SpeedReport:
    outtype: str
    runs: list[MtmdTimings]
    roofline_tokens_per_s: float

    def median(self, name: str) -> float:
        return statistics.median(getattr(t, name) for t in self.runs)

    def line(self) -> str:
        return (f"{self.outtype:6s} TTFT {self.median('time_to_first_token_ms'):7.1f} ms (image "
                f"{self.median('image_encode_ms'):.0f} ms + prompt {self.median('prompt_ms'):.0f} ms / "
                f"{self.runs[0].prompt_tokens} tokens)  decode {self.median('decode_tokens_per_s'):6.1f} tokens/s  "
                f"roofline {self.roofline_tokens_per_s:6.1f} tokens/s "
                f"({self.median('decode_tokens_per_s') / self.roofline_tokens_per_s:.0%})")


def measure_speed(pair: GgufPair, config, images, question: str, bandwidth_bytes_per_s: float,
                  max_new_tokens: int = 32, threads: int = 1, llama: LlamaCpp | None = None) -> SpeedReport:
    """Single-turn runs (one process each) on `images`: TTFT and decode tokens/s per run, beside the decode
    roofline of `config`'s decoder at the pair's weight type and the given bandwidth."""
    # --ignore-eos: every run decodes max_new_tokens, so tokens/s is not taken over a two-word answer
    runs = [run_mtmd(pair, image, question, max_new_tokens, threads, llama=llama, extra_args=["--ignore-eos"]).timings
            for image in images]
    runs = [t for t in runs if t is not None]
    if not runs:
        raise RuntimeError("llama-mtmd-cli printed no timings")
    weights = _weight_format(pair.outtype)
    context = runs[0].prompt_tokens + max_new_tokens // 2  # the cache's mean length over the answer
    roofline = decode_roofline(config, bandwidth_bytes_per_s, weights=weights, kv_bits="fp16", context_length=context)
    return SpeedReport(pair.outtype, runs, roofline.tokens_per_s)


# ----------------------------------------------------------------------------------------------
# `python -m vlm_course export --format llama.cpp`


def idefics3_folder_for(model_dir, scratch: Path) -> Path:
    """The Idefics3 folder to convert: `model_dir` itself when it is one, else a course save_pretrained folder
    saved as Idefics3 into `scratch` (refused with the reasons when the model has features Idefics3 lacks)."""
    from ..vlm import VisionLanguageModel

    model_dir = Path(model_dir)
    config = model_dir / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{model_dir} has no config.json: pass a folder written by model.save_idefics3 "
                                "or model.save_pretrained")
    if '"idefics3"' in config.read_text():
        return model_dir
    if (model_dir / "recipe.json").exists() and (model_dir / "trainable.safetensors").exists():
        raise ValueError(f"{model_dir} is a demo checkpoint (trainable weights on a rebuilt 4-bit base): save it as "
                         "Idefics3 first, `vlm_course.demo.save_as_idefics3(checkpoint, folder)`, and pass that folder "
                         "(the demo must have been trained with `python -m vlm_course demo --layout idefics3`)")
    model = VisionLanguageModel.from_pretrained(model_dir)
    return model.save_idefics3(scratch / "idefics3")


def memory_table(config, pairs: list[GgufPair], context: int = 1024) -> str:
    """Expected memory and decode roofline of each pair on the Orin Nano presets (a markdown table)."""
    from .budget import ORIN_NANO_8GB, ORIN_NANO_SUPER, kv_bytes_per_token

    rows = ["| pair | weights (files) | KV cache (f16, -c %d) | runtime | total | decode roofline 68 / 102 GB/s |"
            % context, "|---|---|---|---|---|---|"]
    kv = kv_bytes_per_token(config.decoder, 16) * context
    for pair in pairs:
        weights = pair.text.stat().st_size + pair.mmproj.stat().st_size
        total = weights + kv + ORIN_NANO_8GB.runtime_overhead_bytes
        speeds = [decode_roofline(config, device, weights=_weight_format(pair.outtype), kv_bits="fp16",
                                  context_length=context // 2).tokens_per_s for device in (ORIN_NANO_8GB, ORIN_NANO_SUPER)]
        rows.append(f"| {pair.outtype} | {weights / 1e6:.0f} MB | {kv / 1e6:.0f} MB | "
                    f"{ORIN_NANO_8GB.runtime_overhead_bytes / 1e6:.0f} MB | {total / 1e9:.2f} GB | "
                    f"{speeds[0]:.0f} / {speeds[1]:.0f} tokens/s |")
    return "\n".join(rows)


def _weight_format(outtype: str):
    return {"f32": "fp32", "f16": "fp16", "bf16": "bf16", "q8_0": "q8_0", "q4_0": "q4_0"}.get(outtype, 4.5)


def write_readme(out_dir: Path, pairs: list[GgufPair], config, llama: LlamaCpp) -> Path:
    """README.md beside the GGUF files: the Jetson build, power mode, run and monitoring commands, and the
    expected memory (templates/llama_cpp_README.md)."""
    from .llama_cpp_build import LLAMA_CPP_PYTHON_VERSION
    from .runtime import TEMPLATES

    rows = "\n".join(f"| {p.outtype} | {p.text.name} ({p.sizes_mb()[0]:.1f} MB) | {p.mmproj.name} "
                     f"({p.sizes_mb()[1]:.1f} MB) |" for p in pairs)
    seconds = llama.build_info().get("build_seconds")
    build_note = (f"the build that converted these files took {seconds} s on {llama.build_info().get('cpu_count')} "
                  "CPU cores" if seconds else "see the course's docs/llama_cpp.md for its build time")
    n = config.image_tokens_per_image
    text = (TEMPLATES / "llama_cpp_README.md").read_text().format(
        llama_version=LLAMA_CPP_PYTHON_VERSION, file_rows=rows, build_note=build_note, first=pairs[-1].outtype,
        question="What colour is the shape?", image_size=config.vision.image_size, image_tokens=n,
        prompt_image_tokens=2 * n, memory_table=memory_table(config, pairs))
    path = out_dir / "README.md"
    path.write_text(text)
    return path


def export_llama_cpp(model_dir, out_dir, outtypes=("f16", "q8_0"), overwrite: bool = False) -> Path:
    """Write text-<type>.gguf and mmproj-<type>.gguf for each type, and a README.md with the Jetson commands.

    model_dir: a saved Idefics3 folder (`model.save_idefics3`) or a course `save_pretrained` folder of a model
    Idefics3 can express (it is saved as Idefics3 on the way; `idefics3_problems` says why one cannot be).
    """
    from ..vlm import VisionLanguageModel

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty: pick another --out or pass --overwrite")
    llama = find_llama_cpp()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="idefics3-") as scratch:
        folder = idefics3_folder_for(model_dir, Path(scratch))
        config = VisionLanguageModel.from_idefics3(folder).config
        pairs = [convert_idefics3(folder, out_dir, outtype, llama) for outtype in outtypes]
    write_readme(out_dir, pairs, config, llama)
    print(f"converted {', '.join(outtypes)} in {time.monotonic() - started:.0f} s")
    return out_dir
