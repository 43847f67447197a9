#!/usr/bin/env python3
"""Answer a question about an image with this exported vision-language model.

    python run.py --image photo.jpg --question "What colour is the circle?"
    python run.py --image photo.jpg --question "..." --provider cuda --int8

Needs only onnxruntime (or onnxruntime-gpu), numpy, pillow and tokenizers: no PyTorch, no vlm_course.
The steps are the ones the PyTorch model takes, written out with numpy:

    image    -> RGB, resize, scale to [0, 1], normalise          -> image_encoder.onnx -> image embeddings
    question -> chat prompt with one <image> token per image embedding -> token ids
    ids      -> rows of embed_tokens.npy, with the image embeddings written over the <image> positions
    decoder.onnx on the whole prompt (empty KV cache), then one token at a time with the returned cache;
    greedy: the next token is the argmax of the last logits; stop at <|im_end|>.

The bundle folder holds manifest.json (every file's size and sha256): the runner checks it first, so a
bundle copied without a file, or with a truncated one, fails with a message that names the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

BUNDLE_FORMAT = 1
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}


class BundleError(RuntimeError):
    """The bundle is incomplete or corrupt, or asks for something this machine does not have."""


# ----------------------------------------------------------------------------------------------
# Checking the bundle


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def verify_bundle(folder: Path, check_hashes: bool = True) -> dict:
    """Compare the folder with manifest.json; raise BundleError naming every missing or changed file."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise BundleError(
            f"{folder} has no manifest.json: it is not a complete bundle (rebuild it with "
            "`python -m vlm_course export --model CHECKPOINT --out BUNDLE`)"
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(
            f"bundle format {manifest.get('format')} but this run.py reads format {BUNDLE_FORMAT}"
        )
    missing, corrupt = [], []
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.exists():
            missing.append(name)
        elif path.stat().st_size != entry["bytes"] or (check_hashes and sha256_of(path) != entry["sha256"]):
            corrupt.append(name)
    if missing or corrupt:
        problems = []
        if missing:
            problems.append(f"the bundle is missing {', '.join(missing)}")
        if corrupt:
            problems.append(f"{', '.join(corrupt)} differ from manifest.json (corrupt or partly copied)")
        raise BundleError(
            "; ".join(problems) + f" in {folder}. Copy the whole bundle folder again "
            "(e.g. `rsync -a --checksum bundle/ jetson:bundle/`) or rebuild it."
        )
    return manifest


def onnx_providers(provider: str) -> list[str]:
    import onnxruntime as ort

    if provider not in PROVIDERS:
        raise BundleError(f"unknown provider {provider!r}: choose one of {', '.join(PROVIDERS)}")
    wanted, available = PROVIDERS[provider], ort.get_available_providers()
    if wanted not in available:
        raise BundleError(
            f"onnxruntime provider {wanted} is not available here (available: {', '.join(available)}). "
            "On a Jetson install the onnxruntime-gpu wheel built for your JetPack (see README.md); "
            "otherwise run with --provider cpu."
        )
    # The CPU provider stays as a fallback for operators the GPU provider lacks.
    return [wanted] if wanted == "CPUExecutionProvider" else [wanted, "CPUExecutionProvider"]


# ----------------------------------------------------------------------------------------------
# Image and prompt


def load_image(image) -> "Image.Image":  # noqa: F821 (PIL is imported lazily)
    from PIL import Image

    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as err:
            raise ValueError(f"could not read the image {image} ({err}): is it a complete PNG/JPEG?") from err
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels become white, as the training processor does.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def preprocess_image(image, size: int, mean, std) -> np.ndarray:
    """(3, size, size) float32: bicubic resize, [0, 1], then (x - mean) / std per channel."""
    from PIL import Image

    image = load_image(image).resize((size, size), Image.Resampling.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / np.float32(255.0)
    mean = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return (pixels - mean) / std


class PromptBuilder:
    """SmolLM2's chat format, built piece by piece exactly as the training processor does."""

    def __init__(
        self, tokenizer, system_prompt, image_token: str, image_token_id: int, tokens_per_image: int,
        image_block_ids: list[int] | None = None,
    ):
        self.tokenizer, self.system_prompt = tokenizer, system_prompt
        # The ids one image becomes, as the training processor wrote them (with a grid layout, each block's place
        # in words between the <image> ids); older bundles: a plain run of <image> ids.
        self.image_token = image_token
        self.image_block = list(image_block_ids) if image_block_ids else [image_token_id] * tokens_per_image

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def __call__(self, question: str, num_images: int = 1) -> list[int]:
        ids = []
        if self.system_prompt is not None:
            ids += self.text_ids(f"<|im_start|>system\n{self.system_prompt}<|im_end|>\n")
        ids += self.text_ids("<|im_start|>user\n")
        parts = question.split(self.image_token)
        if len(parts) == 1:  # no <image> marker: images go first
            ids += self.image_block * num_images + self.text_ids(question)
        elif len(parts) - 1 != num_images:
            raise ValueError(
                f"the question has {len(parts) - 1} {self.image_token} markers for {num_images} images"
            )
        else:
            ids += self.text_ids(parts[0])
            for part in parts[1:]:
                ids += self.image_block + self.text_ids(part)
        return ids + self.text_ids("<|im_end|>\n<|im_start|>assistant\n")


# ----------------------------------------------------------------------------------------------
# The model


class VLMRunner:
    """The exported model on onnxruntime: encode images, build the prompt, greedy generation, KV cache."""

    def __init__(
        self,
        folder,
        provider: str = "cpu",
        int8: bool = False,
        verify: bool = True,
        check_hashes: bool = True,
        threads: int | None = None,
    ):
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        if verify:
            verify_bundle(self.folder, check_hashes=check_hashes)
        self.config = json.loads((self.folder / "bundle.json").read_text())
        files = self.config["files"]
        if int8 and "decoder_int8" not in files:
            raise BundleError("this bundle has no int8 model: rebuild it with --int8, or run without --int8")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        providers = onnx_providers(provider)
        suffix = "_int8" if int8 else ""
        self.image_encoder = ort.InferenceSession(
            str(self.folder / files["image_encoder" + suffix]), options, providers=providers
        )
        self.decoder = ort.InferenceSession(
            str(self.folder / files["decoder" + suffix]), options, providers=providers
        )
        # Memory-mapped: only the rows we look up are read from disk.
        self.embed_tokens = np.load(self.folder / files["embed_tokens"], mmap_mode="r")
        self.tokenizer = Tokenizer.from_file(str(self.folder / files["tokenizer"]))
        c = self.config
        self.prompt = PromptBuilder(
            self.tokenizer, c["system_prompt"], c["image_token"], c["image_token_id"], c["tokens_per_image"],
            c.get("image_block_ids"),
        )
        self.past_names = [i.name for i in self.decoder.get_inputs() if i.name.startswith("past_")]
        # present_key_3 comes back as the next call's past_key_3: pair them by name, not by position
        self.next_past_names = [o.name.replace("present_", "past_") for o in self.decoder.get_outputs()[1:]]

    # -- pieces -------------------------------------------------------------------------------

    def pixel_values(self, images) -> np.ndarray:
        c = self.config
        return np.stack(
            [preprocess_image(im, c["image_size"], c["image_mean"], c["image_std"]) for im in images]
        )

    def encode_images(self, pixel_values: np.ndarray) -> np.ndarray:
        return self.image_encoder.run(None, {"pixel_values": pixel_values.astype(np.float32)})[0]

    def embed(self, ids: list[int], image_embeds: np.ndarray) -> np.ndarray:
        """(1, T, D) token embeddings, the image embeddings written over the <image> positions in order."""
        ids = np.asarray(ids)
        is_image = ids == self.config["image_token_id"]
        features = image_embeds.reshape(-1, image_embeds.shape[-1])
        if int(is_image.sum()) != len(features):
            raise ValueError(
                f"{int(is_image.sum())} image tokens in the prompt for {len(features)} image embeddings"
            )
        embeds = np.array(self.embed_tokens[np.where(is_image, 0, ids)], dtype=np.float32)
        embeds[is_image] = features
        return embeds[None]

    def empty_cache(self) -> dict[str, np.ndarray]:
        c = self.config
        return {
            name: np.zeros((1, c["num_kv_heads"], 0, c["head_dim"]), np.float32) for name in self.past_names
        }

    def decoder_step(self, embeds: np.ndarray, past: dict, past_len: int):
        """The decoder on `embeds` (1, T, D) after `past_len` cached tokens -> (last logits, new cache)."""
        t = embeds.shape[1]
        feeds = {
            "inputs_embeds": embeds,
            "attention_mask": np.ones((1, past_len + t), np.int64),
            "position_ids": np.arange(past_len, past_len + t, dtype=np.int64)[None],
            **past,
        }
        logits, *present = self.decoder.run(None, feeds)
        return logits[:, -1], dict(zip(self.next_past_names, present))

    # -- generation ---------------------------------------------------------------------------

    def generate_ids(
        self,
        images,
        question: str,
        max_new_tokens: int = 32,
        ignore_eos: bool = False,
        timings: dict | None = None,
    ) -> list[int]:
        """Greedy new token ids (eos included when reached). `timings` collects seconds per phase."""
        images = images if isinstance(images, (list, tuple)) else [images]
        clock = time.perf_counter()
        image_embeds = self.encode_images(self.pixel_values(images))
        ids = self.prompt(question, len(images))
        limit = self.config["max_position_embeddings"]
        if len(ids) + max_new_tokens > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"of {limit}: shorten the question or lower --max-new-tokens"
            )
        encoded = time.perf_counter()
        logits, past = self.decoder_step(self.embed(ids, image_embeds), self.empty_cache(), 0)
        first = time.perf_counter()
        new_ids, past_len = [], len(ids)
        while True:
            token = int(np.argmax(logits[0]))
            new_ids.append(token)
            if len(new_ids) >= max_new_tokens or (token == self.config["eos_token_id"] and not ignore_eos):
                break
            embeds = np.array(self.embed_tokens[[token]], dtype=np.float32)[None]
            logits, past = self.decoder_step(embeds, past, past_len)
            past_len += 1
        if timings is not None:
            timings.update(
                image_encode=encoded - clock,
                prefill=first - encoded,
                decode=time.perf_counter() - first,
                prompt_tokens=len(ids),
                new_tokens=len(new_ids),
            )
        return new_ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def answer(self, images, question: str, max_new_tokens: int = 32) -> str:
        return self.decode(self.generate_ids(images, question, max_new_tokens))


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Answer a question about an image with this bundle.")
    parser.add_argument("--image", required=True, nargs="+", help="image file(s)")
    parser.add_argument("--question", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--provider", default="cpu", choices=sorted(PROVIDERS))
    parser.add_argument("--int8", action="store_true", help="use the int8-quantised graphs (if bundled)")
    parser.add_argument("--bundle", default=str(Path(__file__).resolve().parent), help="bundle folder")
    parser.add_argument(
        "--no-hash-check",
        action="store_true",
        help="check file sizes only (hashing ~600 MB takes a few seconds on a Jetson)",
    )
    parser.add_argument("--print-ids", action="store_true", help="also print the generated token ids as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        runner = VLMRunner(
            args.bundle, provider=args.provider, int8=args.int8, check_hashes=not args.no_hash_check
        )
        ids = runner.generate_ids(args.image, args.question, args.max_new_tokens)
    except (BundleError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(runner.decode(ids))
    if args.print_ids:
        print(json.dumps(ids))
    return 0


if __name__ == "__main__":
    sys.exit(main())
