"""Length-grouped batches: every row once per epoch, little padding, a seeded order that resumes exactly."""

import json
import random

import pytest

from vlm_course.data.batching import LengthGroupedRows


def lengths(n=64, seed=0):
    rng = random.Random(seed)
    return [rng.choice((40, 41, 42, 70, 72)) for _ in range(n)]  # short questions and long multiple-choice


def test_an_epoch_sees_every_row_once_in_batches_of_similar_length():
    sizes = lengths()
    source = LengthGroupedRows(list(range(64)), sizes, batch_size=4, seed=0, pool=8)
    epoch = [source.next_indices() for _ in range(16)]
    seen = [i for batch in epoch for i in batch]
    assert sorted(seen) == list(range(64))
    padded = sum(4 * max(sizes[i] for i in batch) for batch in epoch)
    assert padded < 1.1 * sum(sizes)  # a random order would pad ~30% more: long and short rows are not mixed
    assert {len(b) for b in epoch} == {4}


def test_the_order_is_fixed_by_the_seed():
    take = [LengthGroupedRows(list(range(64)), lengths(), 4, seed=s).next_indices() for s in (0, 0, 1)]
    assert take[0] == take[1] != take[2]


def test_state_dict_resumes_exactly_through_json():
    """Saved mid-epoch (as in a checkpoint, written as JSON) and restored: the same batches follow."""
    rows, sizes = list(range(64)), lengths()
    whole = LengthGroupedRows(rows, sizes, 4, seed=3)
    expected = [whole.next_indices() for _ in range(40)]  # past an epoch boundary (16 batches an epoch)
    first = LengthGroupedRows(rows, sizes, 4, seed=3)
    got = [first.next_indices() for _ in range(10)]
    second = LengthGroupedRows(rows, sizes, 4, seed=3)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    got += [second.next_indices() for _ in range(30)]
    assert got == expected


def test_mismatched_resume_and_bad_sizes_are_explained():
    source = LengthGroupedRows(list(range(64)), lengths(), 4, seed=0)
    other = LengthGroupedRows(list(range(64)), lengths(), 8, seed=0)
    with pytest.raises(ValueError, match="same data, batch size and group_by_length"):
        other.load_state_dict(source.state_dict())
    with pytest.raises(ValueError, match="cannot fill one batch"):
        LengthGroupedRows([1, 2], [3, 4], batch_size=4, seed=0)
    with pytest.raises(ValueError, match="rows but"):
        LengthGroupedRows([1, 2], [3], batch_size=1, seed=0)
    with pytest.raises(ValueError, match="hold 4 rows"):
        source.next_rows(3)
