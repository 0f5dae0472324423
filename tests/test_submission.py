"""Tests of cellkit.submission (writer, validator, run-overlap search) and ``cellkit validate``."""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from cellkit import atomic, rle
from cellkit import submission as S

H, W = 4, 6  # tiny test images: height 4, width 6 -> 24 pixels


def _real_root() -> Path:
    env = os.environ.get("CELLKIT_REAL_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def real_sartorius() -> Path:
    root = _real_root() / "sartorius"
    if not (root / "test").is_dir():
        pytest.skip(f"real data not found at {root}")
    return root


@pytest.fixture
def image_dir(tmp_path) -> Path:
    """Three tiny images: a (4x6 png), b (4x6 tif), c (3x5 jpg)."""
    d = tmp_path / "images"
    d.mkdir()
    Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "a.png")
    Image.fromarray(np.zeros((H, W), np.uint8)).save(d / "b.tif")
    Image.fromarray(np.zeros((3, 5), np.uint8)).save(d / "c.jpg")
    (d / "notes.txt").write_text("not an image")
    return d


def _mask(*flat):
    m = np.zeros(H * W, bool)
    m[list(flat)] = True
    return m.reshape(H, W)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _read_rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# ---------------------------------------------------------------- overlapping_pairs

def test_overlapping_pairs_hand_made():
    a = (np.array([0, 10]), np.array([3, 2]))  # pixels 0-2, 10-11
    b = (np.array([2]), np.array([9]))  # pixels 2-10
    c = (np.array([20]), np.array([1]))
    d = (np.array([0]), np.array([30]))  # covers everything
    assert S.overlapping_pairs([a, c]) == []
    assert S.overlapping_pairs([a, b]) == [(0, 1, 2)]  # pixels 2 and 10
    assert S.overlapping_pairs([a, b, c, d]) == [(0, 1, 2), (0, 3, 5), (1, 3, 9), (2, 3, 1)]
    assert S.overlapping_pairs([a]) == []
    assert S.overlapping_pairs([]) == []
    assert S.overlapping_pairs([a, (np.zeros(0, np.int64), np.zeros(0, np.int64)), a]) == [(0, 2, 5)]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=24, max_size=24), min_size=0, max_size=6))
def test_overlapping_pairs_matches_brute_force(masks):
    masks = [np.array(m).reshape(H, W) for m in masks]
    got = S.overlapping_pairs([rle.encode_runs(m) for m in masks])
    expected = [(i, j, int((masks[i] & masks[j]).sum())) for i in range(len(masks))
                for j in range(i + 1, len(masks)) if (masks[i] & masks[j]).any()]
    assert got == expected


# ---------------------------------------------------------------- writer

def test_write_round_trip(tmp_path, image_dir):
    m1, m2 = _mask(0, 1, 2, 7), _mask(12, 13, 23)
    preds = {"a": [m1, rle.encode(m2)], "b": [rle.encode(_mask(5))], "c": []}
    shapes = {"a": (H, W), "b": (H, W), "c": (3, 5)}
    out = S.write_submission(preds, ["a", "b", "c"], tmp_path / "sub.csv", shape=shapes)
    rows = _read_rows(out)
    assert rows == [["id", "predicted"], ["a", "1 3 8 1"], ["a", "13 2 24 1"], ["b", "6 1"], ["c", ""]]
    np.testing.assert_array_equal(rle.decode(rows[1][1], (H, W)), m1)
    np.testing.assert_array_equal(rle.decode(rows[2][1], (H, W)), m2)
    assert S.validate_submission(out, image_dir) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images", "sub.csv"]  # no temp file left


def test_write_rows_form_and_empty_images(tmp_path):
    rows = [("a", _mask(3)), ("b", None), ("a", "10 2")]
    out = S.write_submission(rows, ["c", "a", "b"], tmp_path / "s.csv", shape=(H, W))
    assert _read_rows(out)[1:] == [["c", ""], ["a", "4 1"], ["a", "10 2"], ["b", ""]]


def test_write_drops_empty_masks(tmp_path):
    out = S.write_submission({"a": [np.zeros((H, W), bool), ""], "b": [np.zeros((H, W)), _mask(0)]}, ["a", "b"],
                             tmp_path / "s.csv", shape=(H, W))
    assert _read_rows(out)[1:] == [["a", ""], ["b", "1 1"]]


def test_write_rejects_overlap_naming_id_and_masks(tmp_path):
    preds = {"a": [_mask(0)], "b": [_mask(1, 2), _mask(9), _mask(2, 3)]}
    with pytest.raises(ValueError, match=r"image b: masks 0 and 2 overlap by 1 pixels"):
        S.write_submission(preds, ["a", "b"], tmp_path / "s.csv", shape=(H, W))
    assert not (tmp_path / "s.csv").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mask, match", [
    (np.zeros((H, W + 1), bool), r"image a mask 1: mask shape \(4, 7\) != image shape \(4, 6\)"),
    ("20 6", r"image a mask 1: RLE pair 0: run 20\+6 ends past the image end"),
    ("1 2 3", r"image a mask 1: RLE has an odd number of tokens"),
    ("0 2", r"image a mask 1: RLE pair 0: start 0 < 1"),
    (np.zeros(24, bool), r"image a mask 1: expected an RLE string or a 2-D mask"),
])
def test_write_rejects_bad_masks(tmp_path, mask, match):
    with pytest.raises(ValueError, match=match):
        S.write_submission({"a": [_mask(0), mask]}, ["a"], tmp_path / "s.csv", shape=(H, W))
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_unknown_and_duplicate_ids(tmp_path):
    with pytest.raises(ValueError, match=r"not in image_ids, e.g. \['z'\]"):
        S.write_submission({"z": [_mask(0)]}, ["a"], tmp_path / "s.csv", shape=(H, W))
    with pytest.raises(ValueError, match=r"more than once: \['a'\]"):
        S.write_submission({}, ["a", "b", "a"], tmp_path / "s.csv", shape=(H, W))
    with pytest.raises(ValueError, match="not a valid submission id"):
        S.write_submission({}, ["a,b"], tmp_path / "s.csv", shape=(H, W))
    assert list(tmp_path.iterdir()) == []


def test_write_failure_leaves_previous_file_and_no_temp(tmp_path, monkeypatch):
    path = S.write_submission({"a": [_mask(0)]}, ["a"], tmp_path / "s.csv", shape=(H, W))
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)  # the rename of cellkit.atomic
    with pytest.raises(OSError, match="disk full"):
        S.write_submission({"a": [_mask(5)]}, ["a"], path, shape=(H, W))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]
    with pytest.raises(OSError, match="disk full"):
        S.write_submission({"a": [_mask(5)]}, ["a"], tmp_path / "new.csv", shape=(H, W))
    assert not (tmp_path / "new.csv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]


# ---------------------------------------------------------------- validator

def test_image_sizes(image_dir):
    assert S.image_sizes(image_dir) == {"a": (H, W), "b": (H, W), "c": (3, 5)}


def test_image_sizes_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        S.image_sizes(tmp_path / "nope")
    with pytest.raises(ValueError, match="no images"):
        S.image_sizes(tmp_path)
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "x.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "x.tif")
    with pytest.raises(ValueError, match="two images with id 'x'"):
        S.image_sizes(tmp_path)
    (tmp_path / "x.tif").unlink()
    (tmp_path / "y.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="y.png: cannot read image"):
        S.image_sizes(tmp_path)
    Image.fromarray(np.full((40, 50), 7, np.uint8)).save(tmp_path / "y.png")
    blob = (tmp_path / "y.png").read_bytes()
    (tmp_path / "y.png").write_bytes(blob[: len(blob) // 2])  # header intact, pixels truncated
    with pytest.raises(ValueError, match="y.png: cannot read image"):
        S.image_sizes(tmp_path)


def test_validate_ok(tmp_path, image_dir):
    sub = _write_csv(tmp_path / "s.csv", "id,predicted\na,1 3\na,4 2\nb,\nc,1 15\n")
    report = S.check_submission(sub, image_dir)
    assert report.ok and report.problems == []
    assert (report.n_rows, report.n_masks, report.n_images, report.n_empty_images) == (4, 3, 3, 1)


@pytest.mark.parametrize("text, expected", [
    ("id,annotation\na,\nb,\nc,\n", ["line 1: bad header 'id,annotation' (expected 'id,predicted')"]),
    ("", ["line 1: bad header: the file is empty", "line 0: id a: missing id", "line 0: id b: missing id",
          "line 0: id c: missing id"]),
    ("id,predicted\na,\nb,\nc,\nzz,1 2\n", ["line 5: id zz: unknown id (no image of that id)"]),
    ("id,predicted\na,\nc,\n", ["line 0: id b: missing id: image in"]),
    ("id,predicted\na,1 2 3\nb,\nc,\n", ["line 2: id a: bad RLE: RLE has an odd number of tokens (3)"]),
    ("id,predicted\na,\nb,1 x\nc,\n", ["line 3: id b: bad RLE: RLE token 'x' is not an integer"]),
    ("id,predicted\na,5 2 1 2\nb,\nc,\n", ["line 2: id a: bad RLE: RLE pair 1: unsorted runs"]),
    ("id,predicted\na,0 2\nb,\nc,\n", ["line 2: id a: bad RLE: RLE pair 0: start 0 < 1"]),
    # c is 3x5 = 15 pixels: run 15+2 ends at pixel 16; the same run is fine in the 4x6 image a
    ("id,predicted\na,15 2\nb,\nc,15 2\n",
     ["line 4: id c: out of bounds: RLE pair 0 (run 15+2) ends at pixel 16 past the image end (15 pixels "
      "for height x width 3x5)"]),
    ("id,predicted\na,\nb,\nc,14 2\n", []),
    ("id,predicted\na,1 2 20 6\nb,\nc,\n", ["line 2: id a: out of bounds: RLE pair 1 (run 20+6)"]),
    ("id,predicted\na,1 3\nb,\na,7 1\na,3 2\nc,\n",
     ["line 2: id a: mask overlaps the mask of line 5 by 1 pixels"]),
    ("id,predicted\na,1 1,extra\nb,\nc,\n", ["line 2: id a: expected 2 fields (id,predicted), got 3"]),
])
def test_validate_each_problem(tmp_path, image_dir, text, expected):
    problems = S.validate_submission(_write_csv(tmp_path / "s.csv", text), image_dir)
    assert len(problems) == len(expected), problems
    for got, want in zip(problems, expected):
        assert got.startswith(want), (got, want)


def test_validate_several_problems_sorted_by_line(tmp_path, image_dir):
    text = "id,predicted\na,1 4\nzz,\na,3 1\nb,1 2 3\na,2 2\n"
    problems = S.validate_submission(_write_csv(tmp_path / "s.csv", text), image_dir)
    assert problems == [
        "line 2: id a: mask overlaps the mask of line 4 by 1 pixels",
        "line 2: id a: mask overlaps the mask of line 6 by 2 pixels",
        "line 3: id zz: unknown id (no image of that id)",
        "line 4: id a: mask overlaps the mask of line 6 by 1 pixels",
        "line 5: id b: bad RLE: RLE has an odd number of tokens (3): expected 'start length' pairs",
        f"line 0: id c: missing id: image in {image_dir} has no row (list it with an empty predicted when it has "
        f"no cell)",
    ]


def test_validate_missing_csv(image_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such submission file"):
        S.validate_submission(tmp_path / "absent.csv", image_dir)


# ---------------------------------------------------------------- command

def _run_validate(argv, capsys):
    from cellkit.commands import validate

    parser = argparse.ArgumentParser()
    validate.add_arguments(parser)
    code = validate.run(parser.parse_args(argv))
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err.splitlines()


def test_command_ok(tmp_path, image_dir, capsys):
    sub = S.write_submission({"a": [_mask(0, 1)], "c": [np.ones((3, 5), bool)]}, ["a", "b", "c"],
                             tmp_path / "s.csv", shape=S.image_sizes(image_dir))
    code, out, err = _run_validate([str(sub), "--images", str(image_dir)], capsys)
    assert code == 0 and err == []
    assert out == [f"{sub}: OK: 3 rows, 2 masks, 3 images (1 without cells)"]


def test_command_problems(tmp_path, image_dir, capsys):
    sub = _write_csv(tmp_path / "s.csv", "id,predicted\na,1 3\na,2 1\nq,\n")
    code, out, err = _run_validate([str(sub), "--images", str(image_dir)], capsys)
    assert code == 1
    assert out == [f"{sub}: line 2: id a: mask overlaps the mask of line 3 by 1 pixels",
                   f"{sub}: line 4: id q: unknown id (no image of that id)",
                   f"{sub}: line 0: id b: missing id: image in {image_dir} has no row (list it with an empty "
                   f"predicted when it has no cell)",
                   f"{sub}: line 0: id c: missing id: image in {image_dir} has no row (list it with an empty "
                   f"predicted when it has no cell)"]
    assert err == [f"{sub}: INVALID: 4 problem(s)"]


def test_cli_main(tmp_path, image_dir, capsys):
    from cellkit import cli

    sub = _write_csv(tmp_path / "s.csv", "id,predicted\na,\nb,\nc,\n")
    assert cli.main(["validate", str(sub), "--images", str(image_dir)]) == 0
    assert cli.main(["validate", str(sub), "--images", str(tmp_path / "none")]) == 2
    assert "image directory does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- real data

@pytest.mark.realdata
def test_real_sample_submission_is_valid(real_sartorius):
    """The competition's sample submission lists the 3 public test images, each with an empty predicted."""
    report = S.check_submission(real_sartorius / "sample_submission.csv", real_sartorius / "test")
    assert report.problems == []
    assert (report.n_rows, report.n_masks, report.n_images, report.n_empty_images) == (3, 0, 3, 3)


@pytest.mark.realdata
def test_real_truth_overlaps_found_and_resolved(real_sartorius, tmp_path):
    """Real training masks overlap: the validator finds exactly the overlapping pairs (checked densely here), and
    the writer accepts them once each pixel is kept by its first mask."""
    import pandas as pd

    from cellkit import SHAPE

    truth = pd.read_csv(real_sartorius / "train.csv")
    ids = sorted(truth["id"].unique())[:3]
    images = tmp_path / "images"
    images.mkdir()
    for i in ids:
        (images / f"{i}.png").symlink_to(real_sartorius / "train" / f"{i}.png")
    sub = tmp_path / "truth_as_sub.csv"
    rows = truth[truth["id"].isin(ids)][["id", "annotation"]].rename(columns={"annotation": "predicted"})
    rows.to_csv(sub, index=False)
    expected = []
    for i in ids:
        lines = [n + 2 for n in np.flatnonzero((rows["id"] == i).to_numpy())]
        masks = [rle.decode(rows["predicted"].iloc[n - 2], SHAPE) for n in lines]
        for a in range(len(masks)):
            for b in range(a + 1, len(masks)):
                shared = int((masks[a] & masks[b]).sum())
                if shared:
                    expected.append(f"line {lines[a]}: id {i}: mask overlaps the mask of line {lines[b]} by "
                                    f"{shared} pixels")
    problems = S.validate_submission(sub, images)
    assert expected and sorted(problems) == sorted(expected)

    resolved = {}
    for i in ids:
        taken = np.zeros(SHAPE, bool)
        resolved[i] = []
        for s in rows.loc[rows["id"] == i, "predicted"]:
            m = rle.decode(s, SHAPE) & ~taken
            taken |= m
            resolved[i].append(m)
    with pytest.raises(ValueError, match=f"image {ids[0]}: masks"):
        S.write_submission({i: list(rows.loc[rows["id"] == i, "predicted"]) for i in ids}, ids, sub)
    out = S.write_submission(resolved, ids, tmp_path / "resolved.csv")
    assert S.validate_submission(out, images) == []
