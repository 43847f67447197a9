"""Load the_cauldron (HuggingFaceM4/the_cauldron) or local parquet in its schema, cleanly.

One code path for three sources:

    load_cauldron(["vsr", "ai2d"])                              # the hub (needs network)
    load_cauldron({"shapes": 2, "ocr": 1}, data_dir="assets/mini_cauldron")   # local parquet
    load_mini_cauldron("test")                                  # the committed synthetic subsets

What it does after loading each subset:

1. split:  the hub has only a `train` split. `val_fraction` carves a validation split out of it by
           hashing each row's image bytes, so the split never depends on the seed, the order or the
           mixing, and an image never sits in both splits.
2. clean:  rows with no images, undecodable image bytes, an image smaller than `min_image_size` (one patch),
           no texts, or a turn without a user or assistant string are skipped and counted in a LoadReport,
           never a crash. A file that is not parquet is an error naming it.
3. mix:    subsets are interleaved by mixing weights with a seeded sampler: the same seed gives the
           same sequence of rows, streaming or not.
4. shard:  with `rank` / `world_size` (training on several processes), each subset is split across processes
           with datasets.distributed.split_dataset_by_node after its seeded shuffle, before mixing: each process
           reads only its part (whole parquet shards when their number divides world_size, else every
           world_size-th row), no row reaches two processes, and every process mixes by the same weights.

Clean rows look like {"images": [PIL RGB, ...], "texts": [{"user", "assistant", "source"}, ...],
"source": subset}; several turns stay one conversation.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlm_course.weight_files import apply_offline_env, assets_dir

apply_offline_env()  # before datasets reads its flags: VLM_COURSE_OFFLINE=1 alone must keep datasets off the network

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from datasets.distributed import split_dataset_by_node  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

logger = logging.getLogger(__name__)

HUB_REPO = "HuggingFaceM4/the_cauldron"
SKIP_REASONS = ("no_images", "undecodable_image", "image_too_small", "no_texts", "bad_turn")
# Smallest image side kept by default: the largest patch of the course's profiles (nano: 16 px). An image smaller
# than one patch carries almost nothing and the processor refuses it, so training would stop at that row.
MIN_IMAGE_SIZE = 16
VALIDATION_SPLITS = ("validation", "val")


@dataclass
class LoadReport:
    """What the loader read, kept and skipped (per reason) for one pass over the data."""

    seen: int = 0  # rows of the requested split that were examined
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    kept_per_source: Counter = field(default_factory=Counter)  # subset -> rows

    def summary(self) -> str:
        sources = ", ".join(f"{name} {n}" for name, n in sorted(self.kept_per_source.items()))
        line = f"kept {self.kept} of {self.seen} rows ({sources or 'none'})"
        if self.skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
            line += f"; skipped {sum(self.skipped.values())}: {reasons}"
        return line

    def merge(self, other: LoadReport) -> LoadReport:
        return LoadReport(self.seen + other.seen, self.kept + other.kept, self.skipped + other.skipped,
                          self.kept_per_source + other.kept_per_source)


# -----------------------------------------------------------------------------
# one row


def _image_bytes(value) -> bytes | None:
    """Raw bytes of one stored image: an HF Image struct {"bytes", "path"}, bytes, or a file path."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str) and os.path.isfile(value):
        return Path(value).read_bytes()
    return None


def _decode(data: bytes) -> Image.Image | None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            # A photo's EXIF orientation says how to turn the stored pixels upright (as transformers' load_image).
            upright = ImageOps.exif_transpose(image) or image
            return upright.convert("RGB")  # convert() loads the pixels: truncated files fail here
    except Exception:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        return None


def _decode_images(raw_images, min_size: int = 1):
    """All images of a row as PIL RGB, or (None, reason) when there are none, one does not decode, or one has a
    side shorter than min_size pixels."""
    if not raw_images:
        return None, "no_images"
    images = []
    for value in raw_images:
        data = _image_bytes(value)
        image = _decode(data) if data else None
        if image is None:
            return None, "undecodable_image"
        if min(image.size) < min_size:
            return None, "image_too_small"
        images.append(image)
    return images, None


def _is_text(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _clean_turns(texts, subset: str):
    """The turns as plain dicts, or (None, reason) when the conversation is unusable."""
    if not texts:
        return None, "no_texts"
    turns = []
    for turn in texts:
        if not isinstance(turn, dict) or not (_is_text(turn.get("user")) and _is_text(turn.get("assistant"))):
            return None, "bad_turn"
        turns.append({"user": turn["user"], "assistant": turn["assistant"], "source": turn.get("source") or subset})
    return turns, None


def split_key(raw_images, texts) -> bytes:
    """What decides a row's split: its image bytes (so an image never lands in two splits), else its texts."""
    digest = hashlib.blake2b(digest_size=8)
    blobs = [_image_bytes(v) for v in raw_images or []]
    if any(blobs):
        for blob in blobs:
            digest.update(blob or b"")
    else:
        digest.update(repr(texts).encode())
    return digest.digest()


def in_validation(key: bytes, val_fraction: float) -> bool:
    return int.from_bytes(key, "big") / 2**64 < val_fraction


def _clean_rows(dataset, subset: str, want_validation: bool | None, val_fraction: float, report: LoadReport,
                min_image_size: int = 1):
    """Yield the clean rows of one subset that belong to the requested split, counting the rest."""
    for raw in _undecoded_rows(dataset):
        raw_images, texts = raw.get("images"), raw.get("texts")
        if want_validation is not None:
            if in_validation(split_key(raw_images, texts), val_fraction) != want_validation:
                continue  # the other split's row: not examined, not counted
        report.seen += 1
        turns, reason = _clean_turns(texts, subset)
        if reason is None:
            images, reason = _decode_images(raw_images, min_image_size)
        if reason is not None:
            report.skipped[reason] += 1
            continue
        report.kept += 1
        report.kept_per_source[subset] += 1
        yield {"images": images, "texts": turns, "source": subset}


# -----------------------------------------------------------------------------
# mixing


def _interleave(streams: dict, weights: dict[str, float], seed, max_samples: int | None):
    """Pick the next subset at random by weight until max_samples rows or every subset runs out."""
    rng = np.random.default_rng(seed)
    active = [name for name in streams if weights[name] > 0]
    iterators = {name: iter(streams[name]) for name in active}
    produced = 0
    while active and (max_samples is None or produced < max_samples):
        p = np.array([weights[name] for name in active], dtype=np.float64)
        name = active[int(rng.choice(len(active), p=p / p.sum()))]
        row = next(iterators[name], None)
        if row is None:  # exhausted: the others share its weight from now on
            active.remove(name)
            continue
        produced += 1
        yield row


class CauldronStream:
    """A re-iterable stream of clean rows; `report` describes the latest (or current) pass."""

    def __init__(self, sources: dict, weights: dict[str, float], seed: int, max_samples: int | None,
                 want_validation: bool | None, val_fraction: float, verbose: bool, rank: int = 0, world_size: int = 1,
                 min_image_size: int = MIN_IMAGE_SIZE):
        self.sources, self.weights, self.seed, self.max_samples = sources, weights, seed, max_samples
        self.min_image_size = min_image_size
        self.want_validation, self.val_fraction, self.verbose = want_validation, val_fraction, verbose
        self.rank, self.world_size = rank, world_size  # this process's split (the Trainer checks it)
        self.epoch = 0
        self.report = LoadReport()

    def set_epoch(self, epoch: int) -> None:
        """Another order for another pass: streamed subsets reshuffle with seed + epoch (the same in every process,
        so the split stays disjoint), and the mixing draws anew."""
        self.epoch = epoch
        for dataset in self.sources.values():
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(epoch)

    def __iter__(self):
        report = self.report = LoadReport()
        streams = {name: _clean_rows(ds, name, self.want_validation, self.val_fraction, report, self.min_image_size)
                   for name, ds in self.sources.items()}
        # Each process draws its own subset sequence (same weights), so a global batch is not W copies of one mix.
        seed = self.seed if (self.world_size, self.epoch) == (1, 0) else [self.seed, self.rank, self.epoch]
        yield from _interleave(streams, self.weights, seed, self.max_samples)
        _announce(report, self.verbose)


class CauldronRows(list):
    """A list of clean rows with the LoadReport of the pass that built it."""

    report: LoadReport


def _announce(report: LoadReport, verbose: bool) -> None:
    line = "the_cauldron loader: " + report.summary()
    (logger.warning if report.skipped else logger.info)(line)
    if verbose:
        print(line)


# -----------------------------------------------------------------------------
# loading


def _mixing_weights(subsets, weights) -> dict[str, float]:
    if isinstance(subsets, str):
        subsets = [subsets]
    if isinstance(subsets, dict):
        if weights is not None:
            raise ValueError("give mixing weights either as a dict {subset: weight} or as `weights`, not both")
        mix = {str(name): float(w) for name, w in subsets.items()}
    else:
        names = list(subsets)
        weights = [1.0] * len(names) if weights is None else list(weights)
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} subsets but {len(weights)} weights: give one weight per subset")
        mix = {str(name): float(w) for name, w in zip(names, weights)}
    if not mix:
        raise ValueError("no subsets given: pass a list of the_cauldron config names, e.g. ['vsr', 'ai2d']")
    if any(not np.isfinite(w) or w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"mixing weights must be >= 0 with a positive sum, got {mix}")
    return mix


def local_files(data_dir: str | Path, subset: str, split: str) -> list[str]:
    """Parquet files of one subset and split: {data_dir}/{subset}/{split}*.parquet (the hub's layout)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} does not exist; point it at a folder of <subset>/<split>*.parquet")
    files = sorted(str(p) for p in (data_dir / subset).glob(f"{split}*.parquet"))
    if not files:
        if (data_dir / subset).is_dir():  # the subset is there: the split is what is wrong
            splits = sorted({p.name.split(".")[0].split("-")[0] for p in (data_dir / subset).glob("*.parquet")})
            raise FileNotFoundError(f"no split {split!r} for subset {subset!r} in {data_dir} (no {split}*.parquet); "
                                    f"splits found there: {splits}: choose one of them")
        available = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        raise FileNotFoundError(f"no subset {subset!r} in {data_dir} (no {subset}/{split}*.parquet); "
                                f"subsets found there: {available}")
    return files


def _load_subset(name: str, file_split: str, streaming: bool, data_dir):
    if data_dir is None:
        if file_split != "train":
            raise ValueError(f"the_cauldron on the hub has only a 'train' split, not {file_split!r}; "
                             "use split='validation' with val_fraction > 0 for held-out rows")
        dataset = datasets.load_dataset(HUB_REPO, name, split="train", streaming=streaming)
    else:
        files = local_files(data_dir, name, file_split)
        for file in files:
            _check_parquet(file)
        # A few MB of local parquet load in a blink: datasets' "Generating split" bars would only be noise
        # (and would make notebook outputs differ between a first and a cached run).
        were_enabled = datasets.is_progress_bar_enabled()
        datasets.disable_progress_bars()
        try:
            dataset = datasets.load_dataset("parquet", data_files={file_split: files}, split=file_split,
                                            streaming=streaming)
        finally:
            if were_enabled:
                datasets.enable_progress_bars()
    _check_schema(dataset, name)
    return dataset


def _check_parquet(file: str) -> None:
    """A clear error naming a file that is not parquet (empty, cut short, another format) before datasets reads it."""
    try:
        pq.ParquetFile(file).close()
    except Exception as err:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise ValueError(
            f"{file} is not a readable parquet file ({err}): it may be empty, cut short by an interrupted download "
            "or copy, or another format renamed. Delete it or copy it again (the mini-cauldron: regenerate with "
            "`python -m vlm_course.data.synthetic --out <folder>`)"
        ) from err


def _check_schema(dataset, name: str) -> None:
    features = dataset.features
    if features is None or "images" not in features or "texts" not in features:
        columns = list(features) if features is not None else "unknown"
        raise ValueError(f"subset {name!r} does not look like the_cauldron (columns: {columns}); "
                         "expected an 'images' list and a 'texts' list of {user, assistant, source}")


def _undecoded_rows(dataset):
    """Rows with images left as raw {"bytes", "path"}, so a corrupt image is a skipped row, not an exception."""
    if isinstance(dataset, datasets.Dataset):
        # Arrow batches are never decoded, and unlike cast_column this copies nothing.
        for batch in dataset.with_format("arrow").iter(batch_size=64):
            yield from batch.to_pylist()
        return
    if isinstance(getattr(dataset.features["images"], "feature", None), datasets.Image):
        dataset = dataset.cast_column("images", datasets.Sequence(datasets.Image(decode=False)))  # lazy
    yield from dataset


def load_cauldron(subsets, weights=None, max_samples: int | None = None, streaming: bool = False, seed: int = 0,
                  val_fraction: float = 0.0, split: str = "train", data_dir=None, shuffle: bool = True,
                  shuffle_buffer: int = 1000, verbose: bool = True, rank: int = 0, world_size: int = 1,
                  min_image_size: int = MIN_IMAGE_SIZE):
    """Load, split, clean and mix the_cauldron subsets.

    subsets:      config names (["vsr", "ai2d"]) or a dict of mixing weights ({"vsr": 2, "ai2d": 1})
    weights:      mixing weights for a list of names (default: equal)
    max_samples:  stop after this many clean rows in total (default: until every subset runs out)
    streaming:    read lazily (datasets streaming); returns a re-iterable CauldronStream
    seed:         seeds the shuffle and the mixing; the validation split does not depend on it
    val_fraction: share of rows held out; split="train" excludes them, split="validation" returns them
                  (other splits, e.g. a local "test", are read whole)
    split:        "train", "validation", or another split present in data_dir (e.g. "test")
    data_dir:     read local parquet {data_dir}/{subset}/{split}*.parquet instead of the hub
    rank, world_size: this process's part when training on world_size processes (DistContext.rank/world_size):
                  disjoint rows per process, each mixed by the same weights; max_samples is the total over all
                  processes. Deterministic for (seed, rank, world_size).
    min_image_size: rows with an image whose shorter side has fewer pixels are skipped ("image_too_small");
                  pass the model's patch size (config.vision.patch_size) to keep everything it can read.

    Returns a CauldronRows list (streaming=False) or a CauldronStream; both have `.report`.
    Without streaming every selected image is decoded into memory: use max_samples or streaming for
    large subsets.
    """
    mix = _mixing_weights(subsets, weights)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if max_samples is not None and max_samples < 0:
        raise ValueError(f"max_samples must be >= 0 or None, got {max_samples}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank {rank} of {world_size}")
    if max_samples is not None and world_size > 1:  # this process's share of the total
        max_samples = max_samples // world_size + (rank < max_samples % world_size)
    want_validation = None  # None: take every row of the file split
    file_split = split
    if split in VALIDATION_SPLITS:
        if val_fraction <= 0:
            raise ValueError(f"split={split!r} needs val_fraction > 0 (the validation rows are carved out of train)")
        want_validation, file_split = True, "train"
    elif split == "train" and val_fraction > 0:
        want_validation = False

    sources = {}
    for name in mix:
        dataset = _load_subset(name, file_split, streaming, data_dir)
        if shuffle:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if streaming else dataset.shuffle(seed=seed)
        if world_size > 1:
            # After the seeded shuffle, as datasets asks: every process shuffles identically, then keeps its part.
            dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        sources[name] = dataset
    stream = CauldronStream(sources, mix, seed, max_samples, want_validation, val_fraction, verbose, rank, world_size,
                            min_image_size)
    if streaming:
        return stream
    rows = CauldronRows(stream)
    rows.report = stream.report
    return rows


# -----------------------------------------------------------------------------
# the committed mini-cauldron


def load_mini_cauldron(split: str = "train", subsets=None, max_per_subset: int | None = None,
                       verbose: bool = True, min_image_size: int = MIN_IMAGE_SIZE) -> CauldronRows:
    """The committed synthetic subsets (assets/mini_cauldron), in file order, grouped by subset."""
    root = assets_dir() / "mini_cauldron"
    if not root.is_dir():
        raise FileNotFoundError(
            f"mini-cauldron not found at {root}. Regenerate it with "
            f"`python -m vlm_course.data.synthetic --out {root}` or set VLM_COURSE_ASSETS to the assets folder."
        )
    if subsets is None:
        subsets = sorted(p.name for p in root.iterdir() if p.is_dir())
    elif isinstance(subsets, str):
        subsets = [subsets]
    rows, report = CauldronRows(), LoadReport()
    for name in subsets:
        part = load_cauldron([name], max_samples=max_per_subset, split=split, data_dir=root, shuffle=False,
                             verbose=False, min_image_size=min_image_size)
        rows.extend(part)
        report = report.merge(part.report)
    rows.report = report
    _announce(report, verbose)
    return rows
