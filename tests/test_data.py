"""Tests of the data package: the synthetic mini-cauldron, its committed parquet, and the_cauldron loader.

The synthetic answers are checked against the pixels (colour masks, connected components, centroids,
bounding boxes), not against the generator's own bookkeeping, so a drawing bug or a wrong answer fails.
"""

import hashlib
import io
import re
import subprocess
import sys
from collections import Counter, deque
from pathlib import Path

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vlm_course.data import cauldron, synthetic
from vlm_course.data.cauldron import LoadReport, load_cauldron, load_mini_cauldron
from vlm_course.data.synthetic import (
    COLOURS,
    LETTERS,
    PALETTE,
    POSITION_MARGIN,
    POSITION_QUESTIONS,
    POSITIONS,
    RELATION_PHRASES,
    SHAPES,
    SPLIT_SEEDS,
    SUBSETS,
    TEST_SIZE,
    TRAIN_SIZES,
    WORDS,
    generate,
    generate_mix,
    position_of,
    write_parquet,
)

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "mini_cauldron"
BOX = re.compile(r"^\[(\d+), (\d+), (\d+), (\d+)\]$")

# -----------------------------------------------------------------------------
# reading answers back from the pixels


def objects(image):
    """Each drawn object as (colour name, shape name, pixels at least half covered), read from saturation:
    palette colours are saturated, backgrounds are light tints."""
    pixels = np.asarray(image, dtype=np.float32)
    saturation = pixels.max(-1) - pixels.min(-1)
    found = []
    for part in components(saturation > np.median(saturation) + 35):
        (top, left), (bottom, right) = part.min(0) - 1, part.max(0) + 2  # one pixel of background around
        window = saturation[max(top, 0):bottom, max(left, 0):right]
        ring = np.concatenate([window[0], window[-1], window[:, 0], window[:, -1]])
        background, peak = np.median(ring), np.percentile(saturation[part[:, 0], part[:, 1]], 90)
        coverage = np.clip((window - background) / (peak - background), 0, 1)
        core = part[saturation[part[:, 0], part[:, 1]] > (peak + background) / 2]
        solid = part[saturation[part[:, 0], part[:, 1]] >= 0.9 * peak]
        mean = pixels[solid[:, 0], solid[:, 1]].mean(0)
        colour = min(PALETTE, key=lambda c: np.linalg.norm(mean - np.array(PALETTE[c])))
        found.append((colour, classify(coverage), core))
    return found


def classify(coverage):
    """Shape from a coverage map: area over (widest row x tallest column) is 1 for a square, pi/4 for a
    circle, 1/2 for a triangle or a diamond; a triangle's mass sits low (its centroid at 2/3 height)."""
    rows, cols = coverage.sum(1), coverage.sum(0)
    fill = coverage.sum() / (rows.max() * cols.max())
    if fill > 0.9:
        return "square"
    if fill > 0.65:
        return "circle"
    ys = np.arange(len(rows)) + 0.5
    inside = np.nonzero(rows > 0.3)[0]
    top, bottom = inside.min(), inside.max() + 1
    centroid = (rows * ys).sum() / rows.sum()
    return "triangle" if (centroid - top) / (bottom - top) > 0.58 else "diamond"


def components(mask, min_pixels=6):
    """4-connected components (lists of (y, x)) of a boolean mask, ignoring specks."""
    seen = np.zeros_like(mask)
    found = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, part = deque([(y, x)]), []
        while queue:
            cy, cx = queue.popleft()
            part.append((cy, cx))
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(part) >= min_pixels:
            found.append(np.array(part))
    return found


def find_object(image, colour=None, shape=None):
    """The object referred to by a colour and/or shape (scenes in these subsets make it unique)."""
    parts = [part for c, k, part in objects(image) if colour in (None, c) and shape in (None, k)]
    assert len(parts) == 1, f"expected one {colour or ''} {shape or 'object'}, found {len(parts)}"
    return parts[0]


def references(question):
    """The objects a question mentions, in order: 'red circle', 'circle' or 'red object' -> (colour, shape)."""
    words = re.findall(r"[a-z]+", question.lower())
    refs, k = [], 0
    while k < len(words):
        word = words[k]
        nxt = words[k + 1] if k + 1 < len(words) else ""
        if word in COLOURS and (nxt in SHAPES or nxt in ("object", "one")):
            refs.append((word, nxt if nxt in SHAPES else None))
            k += 2
        elif word in COLOURS:
            refs.append((word, None))
            k += 1
        elif word.rstrip("s") in SHAPES:
            refs.append((None, word.rstrip("s")))
            k += 1
        else:
            k += 1
    return refs


def check_attribute(image, question, answer):
    """shapes/mc: 'What colour is the X?' or 'What shape is the C object?' answered from the pixels."""
    ((colour, shape),) = references(question)
    if answer in COLOURS:
        colour = answer
    else:
        shape = answer
    find_object(image, colour, shape)  # exactly one object of that colour and that shape


def check_count(image, question, answer):
    refs = references(question)
    colour, shape = refs[0] if refs else (None, None)  # no reference: count every object
    got = sum(colour in (None, c) and shape in (None, k) for c, k, _ in objects(image))
    assert str(got) == answer, f"{question!r} -> {answer!r} but the image has {got}"


def relation_of(question):
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in sorted(phrases, key=len, reverse=True):
            if f" {phrase} " in question:
                return relation
    raise AssertionError(f"no relation in {question!r}")


def check_spatial(image, question, answer):
    a, b = references(question)
    (ay, ax), (by, bx) = find_object(image, *a).mean(0), find_object(image, *b).mean(0)
    dx, dy = bx - ax, by - ay
    truth = {
        "left": dx > 0 and abs(dx) > abs(dy),
        "right": dx < 0 and abs(dx) > abs(dy),
        "above": dy > 0 and abs(dy) > abs(dx),
        "below": dy < 0 and abs(dy) > abs(dx),
    }[relation_of(question)]
    assert answer == ("yes" if truth else "no"), f"{question!r} -> {answer!r}; centroids a=({ax},{ay}) b=({bx},{by})"


def check_box(image, question, answer):
    (ref,) = references(question)
    part = find_object(image, *ref)
    size = image.size[0]
    measured = np.array([part[:, 1].min(), part[:, 0].min(), part[:, 1].max() + 1, part[:, 0].max() + 1]) * 1000 / size
    given = np.array([int(v) for v in BOX.match(answer).groups()])
    # The mask misses the faint anti-aliased rim: allow ~2 px at 64 px.
    assert np.abs(measured - given).max() <= 35, f"{question!r}: answer {given}, pixels say {measured.round()}"


def check_position(image, question, answer):
    """position: the cell of the referenced object's pixel box centre (a triangle's mass centroid sits low)."""
    (ref,) = references(question)
    part = find_object(image, *ref)
    cx, cy = (part[:, 1].min() + part[:, 1].max() + 1) / 2, (part[:, 0].min() + part[:, 0].max() + 1) / 2
    assert position_of(cx, cy, image.size[0]) == answer, f"{question!r} -> {answer!r}; pixels centre ({cx}, {cy})"


def parse_mc(question, letter):
    lines = question.split("\n")
    options = dict(line.split(". ", 1) for line in lines if re.match(r"^[A-D]\. ", line))
    assert list(options) == list(LETTERS) and lines[-1] == synthetic.MC_INSTRUCTION
    return lines[0], options[letter], list(options.values())


def check_row(subset, row):
    image = row["images"][0]
    for turn in row["texts"]:
        question, answer = turn["user"], turn["assistant"]
        if subset == "shapes":
            check_attribute(image, question, answer)
        elif subset == "count":
            check_count(image, question, answer)
        elif subset == "spatial":
            check_spatial(image, question, answer)
        elif subset == "grounding":
            check_box(image, question, answer)
        elif subset == "position":
            check_position(image, question, answer)
        elif subset == "mc":
            stem, option, _ = parse_mc(question, answer)
            (check_count if option.isdigit() else check_attribute)(image, stem, option)
        elif subset == "ocr":
            dark = np.asarray(image).max(-1) < 150  # text colours are dark, backgrounds light
            ys, xs = np.nonzero(dark)
            assert len(ys) > 0.01 * image.size[0] * image.size[1], "no legible text drawn"
            assert ys.min() > 0 and xs.min() > 0 and ys.max() < image.size[1] - 1 and xs.max() < image.size[0] - 1, (
                "the word is cut off at the image border"
            )


def pixel_hash(image):
    return hashlib.sha1(np.asarray(image).tobytes()).hexdigest()


# -----------------------------------------------------------------------------
# synthetic generator


@pytest.fixture(scope="module")
def samples():
    return {subset: generate(subset, 48, seed=7) for subset in SUBSETS}


@pytest.mark.parametrize("subset", SUBSETS)
def test_rows_have_cauldron_schema_and_canonical_answers(samples, subset):
    allowed = {
        "shapes": set(COLOURS) | set(SHAPES),
        "count": {str(k) for k in range(1, 6)},
        "spatial": {"yes", "no"},
        "ocr": set(WORDS),
        "mc": set(LETTERS),
        "position": set(POSITIONS),
    }
    for row in samples[subset]:
        assert set(row) == {"images", "texts"}
        (image,) = row["images"]
        assert isinstance(image, Image.Image) and image.mode == "RGB" and image.size == (64, 64)
        assert 1 <= len(row["texts"]) <= 2
        for turn in row["texts"]:
            assert set(turn) == {"user", "assistant", "source"}
            assert turn["source"] == f"synthetic-{subset}" and turn["user"].strip()
            if subset == "grounding":
                x1, y1, x2, y2 = (int(v) for v in BOX.match(turn["assistant"]).groups())
                assert 0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000
                assert turn["user"].endswith(synthetic.BOX_INSTRUCTION)
            else:
                assert turn["assistant"] in allowed[subset]


@pytest.mark.parametrize("subset", SUBSETS)
def test_answers_agree_with_the_pixels(samples, subset):
    for row in samples[subset]:
        check_row(subset, row)


def test_answers_agree_with_the_pixels_at_another_image_size():
    for size in (48, 96):
        for subset in SUBSETS:
            for row in generate(subset, 12, seed=3, image_size=size):
                assert row["images"][0].size == (size, size)
                check_row(subset, row)


def test_pixel_checks_catch_wrong_answers(samples):
    # The checks above must be able to fail: feed them rows with a corrupted answer.
    row = samples["count"][0]
    wrong = str(int(row["texts"][0]["assistant"]) % 5 + 1)
    with pytest.raises(AssertionError):
        check_count(row["images"][0], row["texts"][0]["user"], wrong)
    row = samples["spatial"][0]
    flipped = {"yes": "no", "no": "yes"}[row["texts"][0]["assistant"]]
    with pytest.raises(AssertionError):
        check_spatial(row["images"][0], row["texts"][0]["user"], flipped)
    row = samples["grounding"][0]
    with pytest.raises(AssertionError):
        check_box(row["images"][0], row["texts"][0]["user"], "[0, 0, 1000, 1000]")
    row = samples["position"][0]
    moved = POSITIONS[(POSITIONS.index(row["texts"][0]["assistant"]) + 1) % 9]
    with pytest.raises(AssertionError):
        check_position(row["images"][0], row["texts"][0]["user"], moved)


def test_generation_is_deterministic_per_subset_and_seed():
    def fingerprint(rows):
        return [(pixel_hash(r["images"][0]), r["texts"]) for r in rows]

    for subset in SUBSETS:
        first = fingerprint(generate(subset, 6, seed=11))
        assert first == fingerprint(generate(subset, 6, seed=11))
        assert first[:3] == fingerprint(generate(subset, 3, seed=11))  # a prefix, not a different draw
        assert first != fingerprint(generate(subset, 6, seed=12))


def test_generation_does_not_touch_global_random_state():
    np.random.seed(0)
    expected = np.random.rand()
    np.random.seed(0)
    generate("shapes", 3, seed=0)
    assert np.random.rand() == expected


def test_answers_are_balanced(samples):
    spatial = Counter(row["texts"][0]["assistant"] for row in samples["spatial"])
    assert spatial["yes"] == spatial["no"] == 24
    letters = Counter(row["texts"][0]["assistant"] for row in samples["mc"])
    assert all(letters[L] == 12 for L in LETTERS)
    counts = Counter(row["texts"][0]["assistant"] for row in generate("count", 50, seed=1))
    assert all(counts[str(k)] == 10 for k in range(1, 6))


def test_variety_and_multi_turn(samples):
    assert sum(len(r["texts"]) == 2 for r in samples["shapes"]) >= 5  # some two-turn conversations
    assert sum(len(r["texts"]) == 2 for r in samples["spatial"]) >= 3
    for subset in SUBSETS:
        phrasings = {re.sub(r"\b(" + "|".join(COLOURS + SHAPES) + r")s?\b", "_", r["texts"][0]["user"])
                     for r in samples[subset]}
        assert len(phrasings) >= 3, f"{subset}: only {phrasings}"
        corners = {tuple(np.asarray(r["images"][0])[0, 0]) for r in samples[subset]}
        assert len(corners) > 20, f"{subset}: backgrounds barely vary"
    assert len(synthetic.font_names()) >= 2  # Pillow's default plus matplotlib's DejaVu faces
    words = {r["texts"][0]["assistant"] for r in samples["ocr"]}
    assert len(words) > 20 and all(3 <= len(w) <= 5 and w.isalpha() and w.islower() for w in words)


def test_generate_mix_is_a_seeded_shuffle():
    mix = generate_mix({"count": 4, "ocr": 3}, seed=5)
    sources = Counter(r["texts"][0]["source"] for r in mix)
    assert sources == {"synthetic-count": 4, "synthetic-ocr": 3}
    again = generate_mix({"count": 4, "ocr": 3}, seed=5)
    assert [r["texts"] for r in mix] == [r["texts"] for r in again]
    assert [r["texts"] for r in mix] != [r["texts"] for r in generate_mix({"count": 4, "ocr": 3}, seed=6)]


def test_bad_arguments_explain_themselves():
    with pytest.raises(ValueError, match="choose from"):
        generate("clevr", 2)
    with pytest.raises(ValueError, match="too small"):
        generate("shapes", 2, image_size=16)


def test_small_objects_are_small_true_and_seeded():
    """small_objects (lesson 08's image-splitting data): shapes questions answered by the pixels, on 144 px pictures
    whose objects are half the shapes subset's share of the side (16-26 px), deterministic per seed."""
    rows = synthetic.small_objects(16, seed=2)
    for row in rows:
        image, turn = row["images"][0], row["texts"][0]
        assert image.size == (144, 144) and turn["source"] == "synthetic-small_objects"
        check_attribute(image, turn["user"], turn["assistant"])
        for _, _, core in objects(image):
            extent = (core.max(0) - core.min(0) + 1).max()
            assert 8 <= extent <= 27, extent  # at the shapes subset's share the objects would be 32-52 px
    again = synthetic.small_objects(16, seed=2)
    assert [pixel_hash(r["images"][0]) for r in rows] == [pixel_hash(r["images"][0]) for r in again]
    assert [pixel_hash(r["images"][0]) for r in synthetic.small_objects(4, seed=3)] != \
        [pixel_hash(r["images"][0]) for r in rows[:4]]
    with pytest.raises(ValueError, match="scale"):
        synthetic.small_objects(2, scale=2.0)
    with pytest.raises(ValueError, match="n must be"):
        synthetic.small_objects(-1)


def test_gallery_draws_every_row():
    rows = [generate(subset, 1, seed=0)[0] for subset in SUBSETS]
    fig = synthetic.gallery(rows, ncols=3)
    assert len(fig.axes) == len(rows)
    captions = "\n".join(t.get_text() for t in fig.texts)
    for row in rows:
        assert "A: " + row["texts"][0]["assistant"] in captions
    with pytest.raises(ValueError):
        synthetic.gallery([])


# -----------------------------------------------------------------------------
# position: absolute position in a 3 x 3 grid


def generate_with_scenes(n, seed, image_size=64):
    """generate("position", ...) rows, each with the objects the generator drew (recorded at render time)."""
    drawn, render = [], synthetic.render

    def recording_render(rng, size, shapes=(), text=None):
        drawn.append(list(shapes))
        return render(rng, size, shapes, text)

    synthetic.render = recording_render
    try:
        rows = generate("position", n, seed=seed, image_size=image_size)
    finally:
        synthetic.render = render
    return list(zip(rows, drawn))


def referenced(shapes, question):
    (ref,) = references(question)
    matches = [s for s in shapes if ref[0] in (None, s.colour) and ref[1] in (None, s.shape)]
    assert len(matches) == 1, f"{question!r} refers to {len(matches)} of {shapes}"
    return matches[0]


def test_position_of_names_the_grid_cells():
    assert POSITIONS == ("top left", "top", "top right", "left", "center", "right",
                         "bottom left", "bottom", "bottom right")
    thirds = (10, 32, 54)  # one point per column / row of a 64 px image
    assert [position_of(x, y, 64) for y in thirds for x in thirds] == list(POSITIONS)
    assert position_of(21.2, 42.6, 64) == "left" and position_of(21.4, 42.7, 64) == "bottom"
    assert position_of(0, 0, 64) == "top left" and position_of(64, 64, 64) == "bottom right"  # edges clamp
    assert position_of(150, 150, 300) == "center" and position_of(150, 50, 300) == "top"


def test_position_scene_puts_the_target_in_the_asked_cell():
    rng = np.random.default_rng(0)
    for size in (48, 64, 96):
        for answer in POSITIONS * 10:
            shapes = synthetic._position_scene(rng, size, answer)
            assert 1 <= len(shapes) <= 4
            assert position_of(shapes[0].cx, shapes[0].cy, size) == answer
            assert all(0 <= v <= size for s in shapes for v in s.box)
            assert all(0.2 * size - 1e-9 <= s.size <= 0.3 * size + 1e-9 for s in shapes if 0.2 * size >= 10)


@pytest.fixture(scope="module")
def position_scenes():
    return generate_with_scenes(200, seed=5)


def test_position_generation_is_deterministic():
    first = [(pixel_hash(r["images"][0]), r["texts"]) for r in generate("position", 20, seed=4)]
    assert first == [(pixel_hash(r["images"][0]), r["texts"]) for r in generate("position", 20, seed=4)]
    assert first != [(pixel_hash(r["images"][0]), r["texts"]) for r in generate("position", 20, seed=8)]


def test_position_answers_are_exactly_balanced():
    first_turns = Counter(row["texts"][0]["assistant"] for row in generate("position", 90, seed=2))
    assert first_turns == dict.fromkeys(POSITIONS, 10)


def test_position_answers_are_true_of_the_referenced_object(position_scenes):
    for size, scenes in ((64, position_scenes), (48, generate_with_scenes(30, 6, 48)), (96, generate_with_scenes(30, 7, 96))):
        for row, shapes in scenes:
            for turn in row["texts"]:
                assert turn["assistant"] in POSITIONS
                target = referenced(shapes, turn["user"])
                assert position_of(target.cx, target.cy, size) == turn["assistant"], (turn, target)
            if len(row["texts"]) == 2:  # the follow-up asks about another object
                assert referenced(shapes, row["texts"][0]["user"]) is not referenced(shapes, row["texts"][1]["user"])


def test_position_centres_are_clear_of_the_boundaries_one_object_per_cell(position_scenes):
    margin = POSITION_MARGIN * 64
    assert margin == 3
    sizes = Counter()
    for _row, shapes in position_scenes:
        sizes[len(shapes)] += 1
        for s in shapes:
            for v in (s.cx, s.cy):
                assert min(abs(v - 64 / 3), abs(v - 128 / 3)) >= margin, s
        cells = [position_of(s.cx, s.cy, 64) for s in shapes]
        assert len(set(cells)) == len(cells), cells
        assert len({s.colour for s in shapes}) == len({s.shape for s in shapes}) == len(shapes)  # unique refs
    assert set(sizes) == {1, 2, 3, 4}


def test_position_phrasing_and_conversations(position_scenes):
    patterns = {t: re.escape(t).replace(r"\{ref\}", "(.+)") for t in POSITION_QUESTIONS}
    templates = set()
    for row, _shapes in position_scenes:
        for turn in row["texts"]:
            matching = [t for t, pattern in patterns.items() if re.fullmatch(pattern, turn["user"])]
            assert len(matching) == 1, turn["user"]
            templates.add(matching[0])
    assert len(templates) >= 5
    two_turns = sum(len(row["texts"]) == 2 for row, _ in position_scenes)
    assert 30 <= two_turns <= 70, f"{two_turns} of 200 rows have a second turn; about a quarter expected"
    kinds = {(c is not None, k is not None) for row, _ in position_scenes for c, k in references(row["texts"][0]["user"])}
    assert kinds == {(True, True), (True, False), (False, True)}  # "red circle", "red object", "circle"


def test_committed_position_parquet_is_byte_identical_to_a_regeneration(tmp_path):
    for split, n in (("test", TEST_SIZE), ("train", TRAIN_SIZES["position"])):
        fresh = write_parquet(generate("position", n, seed=SPLIT_SEEDS[split]), tmp_path / f"{split}.parquet")
        assert fresh.read_bytes() == (ASSETS / "position" / f"{split}.parquet").read_bytes(), (
            f"position/{split}.parquet differs; regenerate: python -m vlm_course.data.synthetic "
            "--out assets/mini_cauldron --subsets position"
        )


# -----------------------------------------------------------------------------
# committed mini-cauldron parquet


def read_split(subset, split):
    table = pq.read_table(ASSETS / subset / f"{split}.parquet").to_pylist()
    return [{"images": [Image.open(io.BytesIO(im["bytes"])) for im in row["images"]], "texts": row["texts"]}
            for row in table]


def test_committed_files_sizes_and_row_counts():
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 25e6, f"mini-cauldron is {total / 1e6:.1f} MB; keep it under 25 MB"
    assert (ASSETS / "gallery.png").stat().st_size > 10_000
    for subset in SUBSETS:
        assert pq.read_metadata(ASSETS / subset / "train.parquet").num_rows == TRAIN_SIZES[subset]
        assert pq.read_metadata(ASSETS / subset / "test.parquet").num_rows == TEST_SIZE


def test_datasets_reads_committed_parquet_as_images():
    ds = datasets.load_dataset("parquet", data_files=str(ASSETS / "ocr" / "test.parquet"), split="train")
    assert isinstance(ds.features["images"].feature, datasets.Image)
    row = ds[0]
    assert isinstance(row["images"][0], Image.Image) and row["images"][0].size == (64, 64)
    assert set(row["texts"][0]) == {"user", "assistant", "source"}


def test_train_and_test_share_no_image():
    for subset in SUBSETS:
        train = {pixel_hash(r["images"][0]) for r in read_split(subset, "train")}
        test = {pixel_hash(r["images"][0]) for r in read_split(subset, "test")}
        assert len(test) == TEST_SIZE
        assert not train & test, f"{subset}: {len(train & test)} test images also in train"


def test_committed_test_split_matches_the_generator():
    # Texts must match exactly; pixels within a hair (another Pillow/FreeType build may anti-alias
    # differently). If this fails, regenerate: python -m vlm_course.data.synthetic --out assets/mini_cauldron
    for subset in SUBSETS:
        committed = read_split(subset, "test")
        fresh = generate(subset, TEST_SIZE, seed=SPLIT_SEEDS["test"])
        assert [r["texts"] for r in committed] == [r["texts"] for r in fresh], subset
        diff = max(np.abs(np.asarray(a["images"][0], np.int16) - np.asarray(b["images"][0], np.int16)).mean()
                   for a, b in zip(committed, fresh))
        assert diff < 2.0, f"{subset}: committed images differ from the generator by {diff:.2f} per pixel"


def test_committed_answers_agree_with_the_pixels():
    for subset in SUBSETS:
        for row in read_split(subset, "test")[:30]:
            check_row(subset, row)


def test_regeneration_is_byte_identical(tmp_path):
    def run(out):
        subprocess.run([sys.executable, "-m", "vlm_course.data.synthetic", "--out", str(out),
                        "--train-size", "6", "--test-size", "3"], check=True, capture_output=True)
        return {p.relative_to(out): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}

    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert len(first) == 2 * len(SUBSETS) + 1  # train + test per subset, and the gallery
    assert first == second


# -----------------------------------------------------------------------------
# the_cauldron loader on local parquet


@pytest.fixture(autouse=True)
def no_shutdown_sleep(monkeypatch):
    # datasets sleeps 5 s whenever a shuffled parquet stream closes, to dodge a pyarrow crash at
    # interpreter exit (apache/arrow#45214). Inside a running test process that only costs time.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


def corrupt_rows():
    good = generate("count", 3, seed=99)
    png = synthetic.png_bytes(good[0]["images"][0])
    texts = good[0]["texts"]
    return {
        "undecodable_image": [
            {"images": [b"\x89PNG\r\n\x1a\nthis is not an image"], "texts": texts},
            {"images": [png[: len(png) // 2]], "texts": texts},  # truncated file
            {"images": [good[1]["images"][0], b"garbage"], "texts": texts},  # second image broken
        ],
        "no_texts": [{"images": good[0]["images"], "texts": []}],
        "no_images": [{"images": [], "texts": texts}],
        "bad_turn": [
            {"images": good[2]["images"], "texts": [{"user": "How many?", "assistant": "", "source": "x"}]},
            {"images": good[2]["images"], "texts": [{"user": None, "assistant": "2", "source": "x"}]},
        ],
    }


@pytest.fixture(scope="module")
def local_cauldron(tmp_path_factory):
    root = tmp_path_factory.mktemp("cauldron")
    alpha = generate("shapes", 100, seed=21)
    broken = [row for rows in corrupt_rows().values() for row in rows]
    rows = alpha[:]
    for k, row in enumerate(broken):  # scatter the broken rows among the good ones
        rows.insert(7 + 13 * k, row)
    # Two files for alpha, as the hub shards a subset.
    write_parquet(rows[:60], root / "alpha" / "train-00000-of-00002.parquet")
    write_parquet(rows[60:], root / "alpha" / "train-00001-of-00002.parquet")
    beta = generate("count", 100, seed=22)
    write_parquet(beta, root / "beta" / "train.parquet")
    return {"root": root, "alpha": alpha, "beta": beta, "broken": corrupt_rows()}


def key(row):
    return (pixel_hash(row["images"][0]), str(row["texts"]))


def test_broken_rows_are_skipped_and_counted(local_cauldron, capsys):
    rows = load_cauldron(["alpha"], data_dir=local_cauldron["root"], shuffle=False)
    expected = {reason: len(v) for reason, v in local_cauldron["broken"].items()}
    assert dict(rows.report.skipped) == expected
    assert rows.report.kept == len(rows) == 100
    assert rows.report.seen == 100 + sum(expected.values())
    assert [key(r) for r in rows] == [key(r) for r in local_cauldron["alpha"]]  # order kept, nothing lost
    assert all(r["source"] == "alpha" and r["images"][0].mode == "RGB" for r in rows)
    printed = capsys.readouterr().out
    assert "kept 100 of 107 rows" in printed and "undecodable_image 3" in printed and "bad_turn 2" in printed


def test_multi_turn_rows_stay_conversations(local_cauldron):
    rows = load_cauldron(["alpha"], data_dir=local_cauldron["root"], shuffle=False, verbose=False)
    two_turns = [r for r in rows if len(r["texts"]) == 2]
    assert two_turns and len(two_turns) == sum(len(r["texts"]) == 2 for r in local_cauldron["alpha"])


def test_streaming_gives_the_same_rows_and_report(local_cauldron):
    kwargs = dict(data_dir=local_cauldron["root"], shuffle=False, verbose=False)
    eager = load_cauldron(["alpha"], **kwargs)
    stream = load_cauldron(["alpha"], streaming=True, **kwargs)
    assert not isinstance(stream, list)
    assert [key(r) for r in stream] == [key(r) for r in eager]
    assert stream.report == eager.report
    assert [key(r) for r in stream] == [key(r) for r in eager]  # re-iterable


def test_mixing_follows_weights_and_is_deterministic(local_cauldron):
    def load(seed, streaming=False):
        rows = load_cauldron({"alpha": 3, "beta": 1}, max_samples=80, seed=seed, data_dir=local_cauldron["root"],
                             streaming=streaming, verbose=False)
        return [(r["source"], r["texts"][0]["user"]) for r in rows]

    first = load(seed=0)
    assert len(first) == 80
    alpha = sum(source == "alpha" for source, _ in first)
    assert 48 <= alpha <= 72, f"weights 3:1 should give ~60 alpha rows of 80, got {alpha}"
    assert load(seed=0) == first
    assert load(seed=1) != first
    streamed = load(seed=0, streaming=True)
    assert len(streamed) == 80 and load(seed=0, streaming=True) == streamed


def test_mixing_without_cap_uses_every_row_and_zero_weight_drops_a_subset(local_cauldron):
    root = local_cauldron["root"]
    everything = load_cauldron(["alpha", "beta"], data_dir=root, verbose=False)
    assert Counter(r["source"] for r in everything) == {"alpha": 100, "beta": 100}
    only_beta = load_cauldron(["alpha", "beta"], weights=[0, 1], data_dir=root, verbose=False)
    assert {r["source"] for r in only_beta} == {"beta"} and len(only_beta) == 100


def test_validation_split_is_disjoint_stable_and_seed_independent(local_cauldron):
    root = local_cauldron["root"]

    def hashes(**kwargs):
        rows = load_cauldron(["beta"], data_dir=root, val_fraction=0.25, verbose=False, **kwargs)
        return [pixel_hash(r["images"][0]) for r in rows]

    train, val = hashes(split="train"), hashes(split="validation")
    assert not set(train) & set(val)
    assert set(train) | set(val) == {pixel_hash(r["images"][0]) for r in local_cauldron["beta"]}
    assert 10 <= len(val) <= 40, f"val_fraction 0.25 of 100 rows gave {len(val)}"
    assert set(hashes(split="validation", seed=123)) == set(val)
    assert set(hashes(split="validation", streaming=True)) == set(val)
    assert Counter(hashes(split="train", seed=5)) == Counter(train)


def test_loader_errors_say_what_to_do(local_cauldron):
    root = local_cauldron["root"]
    with pytest.raises(ValueError, match="val_fraction > 0"):
        load_cauldron(["beta"], data_dir=root, split="validation")
    with pytest.raises(FileNotFoundError, match="subsets found there: \\['alpha', 'beta'\\]"):
        load_cauldron(["gamma"], data_dir=root)
    with pytest.raises(ValueError, match="only a 'train' split"):
        load_cauldron(["vsr"], split="test")
    with pytest.raises(ValueError, match="not both"):
        load_cauldron({"alpha": 1}, weights=[1], data_dir=root)
    with pytest.raises(ValueError, match="one weight per subset"):
        load_cauldron(["alpha", "beta"], weights=[1], data_dir=root)
    with pytest.raises(ValueError, match=">= 0"):
        load_cauldron({"alpha": -1, "beta": 1}, data_dir=root)


def test_hub_path_calls_datasets_with_the_cauldron_repo(local_cauldron, monkeypatch):
    calls = []
    local = datasets.load_dataset("parquet", data_files=str(local_cauldron["root"] / "beta" / "train.parquet"),
                                  split="train", streaming=True)

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return local

    monkeypatch.setattr(cauldron.datasets, "load_dataset", fake_load_dataset)
    rows = list(load_cauldron(["vsr"], streaming=True, max_samples=5, verbose=False))
    assert calls == [("HuggingFaceM4/the_cauldron", "vsr", {"split": "train", "streaming": True})]
    assert len(rows) == 5 and rows[0]["source"] == "vsr"


def test_load_report_summary_and_merge():
    a = LoadReport(seen=5, kept=4, skipped=Counter(no_texts=1), kept_per_source=Counter(x=4))
    b = LoadReport(seen=3, kept=3, kept_per_source=Counter(y=3))
    merged = a.merge(b)
    assert (merged.seen, merged.kept) == (8, 7)
    assert merged.summary() == "kept 7 of 8 rows (x 4, y 3); skipped 1: no_texts 1"


def test_load_mini_cauldron_reads_the_committed_assets(capsys):
    rows = load_mini_cauldron("test", max_per_subset=4)
    assert Counter(r["source"] for r in rows) == dict.fromkeys(SUBSETS, 4)
    n = 4 * len(SUBSETS)
    assert rows.report.kept == n and not rows.report.skipped
    assert f"kept {n} of {n} rows" in capsys.readouterr().out
    first_shapes = next(r for r in rows if r["source"] == "shapes")
    assert first_shapes["texts"] == generate("shapes", 1, seed=SPLIT_SEEDS["test"])[0]["texts"]


def test_load_mini_cauldron_honours_the_assets_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("VLM_COURSE_ASSETS", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m vlm_course.data.synthetic"):
        load_mini_cauldron()
    write_parquet(generate("ocr", 3, seed=0), tmp_path / "mini_cauldron" / "ocr" / "train.parquet")
    rows = load_mini_cauldron(verbose=False)
    assert [r["texts"] for r in rows] == [r["texts"] for r in generate("ocr", 3, seed=0)]
