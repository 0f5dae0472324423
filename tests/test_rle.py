"""Tests of cellkit.rle: the competition's run-length encoding (1-indexed, row-major) and the COCO bridge."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from cellkit import rle

SHAPE = (4, 6)  # tiny image: 24 pixels


# ------------------------------------------------------------------------------------------- hand-made cases
def test_decode_is_one_indexed_and_row_major():
    mask = rle.decode("2 3 10 2", SHAPE)
    expected = np.zeros(SHAPE, bool)
    expected[0, 1:4] = True  # pixels 2..4 (1-indexed) = row 0, x 1..3
    expected[1, 3:5] = True  # pixels 10..11 = row 1 (starts at 7), x 3..4
    assert mask.dtype == bool and mask.shape == SHAPE
    np.testing.assert_array_equal(mask, expected)


def test_run_may_wrap_to_the_next_row():
    mask = rle.decode("5 4", SHAPE)
    assert mask[0, 4:].all() and mask[1, :2].all() and mask.sum() == 4


def test_encode_known_mask():
    mask = np.zeros(SHAPE, bool)
    mask[0, 0] = mask[3, 5] = True  # first and last pixel
    mask[2, 1:3] = True
    assert rle.encode(mask) == "1 1 14 2 24 1"
    assert rle.encode(mask.astype(np.uint8) * 7) == "1 1 14 2 24 1"  # any dtype, nonzero = inside


def test_empty_mask_round_trip():
    assert rle.encode(np.zeros(SHAPE, bool)) == ""
    for empty in ("", "   ", None, float("nan")):
        assert not rle.decode(empty, SHAPE).any()
        starts, lengths = rle.parse(empty, SHAPE)
        assert starts.size == lengths.size == 0


def test_full_mask():
    assert rle.encode(np.ones(SHAPE, bool)) == "1 24"
    assert rle.decode("1 24", SHAPE).all()


def test_parse_returns_zero_indexed_starts():
    starts, lengths = rle.parse("3 2 10 1", SHAPE)
    assert starts.dtype == np.int64 and lengths.dtype == np.int64
    assert starts.tolist() == [2, 9] and lengths.tolist() == [2, 1]


def test_touching_runs_are_accepted():
    # non-canonical (one run written as two) but valid: same mask as "1 4"
    np.testing.assert_array_equal(rle.decode("1 2 3 2", SHAPE), rle.decode("1 4", SHAPE))


def test_whitespace_variants_parse_like_single_spaces():
    for s in ("1 2\t5 1", " 1 2 5 1 ", "1  2\n5 1"):
        assert rle.encode(rle.decode(s, SHAPE)) == "1 2 5 1"


def test_runs_to_indices_and_area():
    starts, lengths = rle.parse("2 3 10 2", SHAPE)
    assert rle.runs_to_indices(starts, lengths).tolist() == [1, 2, 3, 9, 10]
    assert rle.runs_to_indices(np.zeros(0, np.int64), np.zeros(0, np.int64)).size == 0
    assert rle.area("2 3 10 2", SHAPE) == 5


def test_runs_to_string():
    assert rle.runs_to_string(np.array([1, 9]), np.array([3, 2])) == "2 3 10 2"
    assert rle.runs_to_string(np.zeros(0, np.int64), np.zeros(0, np.int64)) == ""


def test_encode_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        rle.encode(np.zeros((2, 3, 4), bool))


# ------------------------------------------------------------------------------------------- malformed input
MALFORMED = [
    ("1 2 3", "odd number of tokens"),
    ("1 2 x 3", "'x' is not an integer"),
    ("1 2 3.5 1", "'3.5' is not an integer"),
    ("1 2 1e1 1", "'1e1' is not an integer"),
    ("0 2", r"start 0 < 1"),
    ("-3 2", r"start -3 < 1"),
    ("1 0", r"length 0 < 1"),
    ("1 -2", r"length -2 < 1"),
    ("23 3", "past the image end"),
    ("25 1", "past the image end"),
    ("99999999999999999999 1", "out of the int64 range"),
    ("2 9223372036854775807", "past the image end"),  # would overflow int64 if start + length were added first
    ("10 2 1 2", "unsorted"),
    ("1 5 4 2", "overlapping"),
    ("1 2 2 2", "overlapping"),
]


@pytest.mark.parametrize("bad, message", MALFORMED)
def test_malformed_strings_raise_value_error(bad, message):
    for fn in (rle.parse, rle.validate, rle.decode, rle.area):
        with pytest.raises(ValueError, match=message):
            fn(bad, SHAPE)


def test_malformed_message_names_the_pair():
    with pytest.raises(ValueError, match="pair 2"):
        rle.parse("1 1 5 1 3 1", SHAPE)


def test_non_string_rejected():
    with pytest.raises(ValueError, match="must be a string"):
        rle.parse(12, SHAPE)


# ------------------------------------------------------------------------------------------- parse_many
def test_parse_many_matches_parse():
    strings = ["2 3 10 2", "", "1 1 24 1", "5 4", "  ", None, "1 2\t5 1"]
    starts, lengths, counts = rle.parse_many(strings, SHAPE)
    assert counts.tolist() == [2, 0, 2, 1, 0, 0, 2]
    expected = [rle.parse(s, SHAPE) for s in strings]
    np.testing.assert_array_equal(starts, np.concatenate([e[0] for e in expected]))
    np.testing.assert_array_equal(lengths, np.concatenate([e[1] for e in expected]))


def test_parse_many_masks_may_overlap_each_other():
    # the order check applies within a mask, never across masks
    starts, lengths, counts = rle.parse_many(["10 3", "1 12", "11 1"], SHAPE)
    assert starts.tolist() == [9, 0, 10] and counts.tolist() == [1, 1, 1]


def test_parse_many_empty_list():
    starts, lengths, counts = rle.parse_many([], SHAPE)
    assert starts.size == lengths.size == counts.size == 0


@pytest.mark.parametrize("bad, message", MALFORMED)
def test_parse_many_names_the_bad_mask(bad, message):
    with pytest.raises(rle.MaskError, match=message) as info:
        rle.parse_many(["1 2", "3 1 7 2", bad, "1 1"], SHAPE)
    assert info.value.index == 2 and isinstance(info.value, ValueError)
    assert str(info.value).startswith("mask 2: ")


# ------------------------------------------------------------------------------------------- COCO bridge
def test_coco_bridge_round_trip():
    from pycocotools import mask as mask_util

    s = "2 3 10 2 24 1"
    coco = rle.to_coco(s, SHAPE)
    assert coco["size"] == [4, 6] and isinstance(coco["counts"], str)
    decoded = mask_util.decode({"size": coco["size"], "counts": coco["counts"].encode()})
    np.testing.assert_array_equal(decoded.astype(bool), rle.decode(s, SHAPE))
    assert rle.from_coco(coco) == s


def test_from_coco_uncompressed_counts():
    # column-major counts over a 4x6 image: 1 zero, 2 ones (pixels (1,0),(2,0)), rest zeros
    coco = {"size": [4, 6], "counts": [1, 2, 21]}
    expected = np.zeros(SHAPE, bool)
    expected[1:3, 0] = True
    assert rle.from_coco(coco) == rle.encode(expected)


def test_to_coco_many_equals_to_coco():
    h, w = 30, 40

    def box(y0, y1, x0, x1):
        m = np.zeros((h, w), dtype=bool)
        m[y0:y1, x0:x1] = True
        return m

    rng = np.random.default_rng(0)
    masks = [rng.random((h, w)) < p for p in (0.02, 0.3, 0.9)]
    masks += [box(0, 1, 0, 1), box(h - 1, h, w - 1, w), box(0, h, 0, w), box(3, 9, 0, w)]
    strings = [rle.encode(m) for m in masks]
    got = rle.to_coco_many([rle.parse(s, (h, w)) for s in strings], (h, w))
    assert got == [rle.to_coco(s, (h, w)) for s in strings]
    assert rle.to_coco_many([], (h, w)) == []


def test_to_coco_many_rejects_empty_mask():
    with pytest.raises(ValueError, match="mask 0 is empty"):
        rle.to_coco_many([rle.parse("", SHAPE)], SHAPE)


# ------------------------------------------------------------------------------------------- properties
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 7), st.integers(1, 9), st.data())
def test_to_coco_many_property(h, w, data):
    """Any batch of non-empty masks of any small shape converts like rle.to_coco, mask by mask."""
    masks = data.draw(st.lists(arrays(bool, (h, w)).filter(np.any), min_size=1, max_size=4))
    strings = [rle.encode(m) for m in masks]
    got = rle.to_coco_many([rle.parse(s, (h, w)) for s in strings], (h, w))
    assert got == [rle.to_coco(s, (h, w)) for s in strings]


@st.composite
def masks(draw):
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    return draw(arrays(bool, (h, w)))


@given(masks())
@settings(max_examples=300, deadline=None)
def test_decode_encode_round_trip(mask):
    s = rle.encode(mask)
    np.testing.assert_array_equal(rle.decode(s, mask.shape), mask)
    starts, lengths = rle.encode_runs(mask)
    assert int(lengths.sum()) == int(mask.sum())


@st.composite
def canonical_strings(draw):
    """A canonical competition string (sorted, non-touching runs, single spaces) and its shape."""
    h = draw(st.integers(1, 10))
    w = draw(st.integers(1, 10))
    n = h * w
    cuts = sorted(draw(st.sets(st.integers(0, n), max_size=12)))
    cuts = cuts[: len(cuts) // 2 * 2]  # pairs [begin, end): disjoint and sorted; equal cuts impossible (a set)
    pairs = [(cuts[i], cuts[i + 1]) for i in range(0, len(cuts), 2)]
    # drop runs that touch the previous one (they would merge, so the string would not be canonical)
    kept = []
    for begin, end in pairs:
        if kept and begin == kept[-1][1]:
            continue
        kept.append((begin, end))
    return " ".join(f"{b + 1} {e - b}" for b, e in kept), (h, w)


@given(canonical_strings())
@settings(max_examples=300, deadline=None)
def test_encode_decode_round_trip_on_canonical_strings(case):
    s, shape = case
    assert rle.encode(rle.decode(s, shape)) == s
    starts, lengths, counts = rle.parse_many([s, s], shape)
    assert counts.tolist() == [len(s.split()) // 2] * 2


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_round_trip_on_every_real_annotation(real_train_csv):
    frame = pd.read_csv(real_train_csv)
    shape = (int(frame["height"].iat[0]), int(frame["width"].iat[0]))
    assert ((frame["height"] == shape[0]) & (frame["width"] == shape[1])).all()
    bad = [i for i, s in enumerate(frame["annotation"]) if rle.encode(rle.decode(s, shape)) != s]
    assert not bad, f"{len(bad)} annotations do not round-trip, e.g. row {bad[0]}"
    # the batch parser agrees with the single-string parser on a whole image
    group = frame[frame["id"] == frame["id"].iat[0]]["annotation"].tolist()
    starts, lengths, counts = rle.parse_many(group, shape)
    assert counts.sum() == sum(rle.parse(s, shape)[0].size for s in group)
    np.testing.assert_array_equal(starts, np.concatenate([rle.parse(s, shape)[0] for s in group]))


def test_coco_segmentation_accepts_every_detectron2_form():
    """Compressed (str) and uncompressed (list) COCO RLE and polygons give the same pycocotools RLE mask."""
    from pycocotools import mask as mask_util

    h, w = 12, 10
    mask = np.zeros((h, w), dtype=bool)
    mask[2:7, 3:9] = True
    compressed = rle.to_coco(rle.encode(mask), (h, w))
    column = mask.ravel(order="F").astype(np.int8)
    edges = np.flatnonzero(np.diff(column, prepend=0, append=0))
    counts = np.diff(np.concatenate(([0], edges, [h * w]))).tolist()
    uncompressed = {"size": [h, w], "counts": counts}
    for segm in (compressed, uncompressed):
        assert (mask_util.decode(rle.coco_segmentation(segm, h, w)) == mask).all()
    polygon = [[3.0, 2.0, 9.0, 2.0, 9.0, 7.0, 3.0, 7.0]]
    from_poly = mask_util.decode(rle.coco_segmentation(polygon, h, w)).astype(bool)
    assert from_poly[3:6, 4:8].all() and not from_poly[:, 0].any() and not from_poly[10:, :].any()
