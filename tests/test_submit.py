"""Tests of ``python -m cellkit submit``: post-processing + the ground-floor writer, always a valid submission."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from cellkit import CELL_TYPES
from cellkit import postprocess as pp
from cellkit import predictions as P
from cellkit.cli import main
from cellkit.submission import validate_submission

H, W = 24, 32


def soft(y0, y1, x0, x1, value=220):
    crop = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    crop[1:-1, 1:-1] = value
    return crop


def pred(image_id, scores, windows, classes=None):
    windows = np.array(windows, dtype=np.int32).reshape(-1, 4)
    masks = [soft(y0, y1, x0, x1) for x0, y0, x1, y1 in windows]
    classes = [0] * len(scores) if classes is None else classes
    return P.InstancePredictions(image_id, H, W, classes, scores, windows.astype(np.float32), windows, masks)


@pytest.fixture
def setup(tmp_path):
    images = tmp_path / "test"
    images.mkdir()
    for image_id in ("a1", "b2", "c3"):
        Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(images / f"{image_id}.png")
    store = tmp_path / "pred"
    # a1: two overlapping confident cells + one weak; b2: only weak detections; c3: no detection at all
    P.save(pred("a1", [0.9, 0.8, 0.2], [(0, 0, 12, 12), (6, 6, 20, 20), (22, 2, 30, 10)]), store)
    P.save(pred("b2", [0.3, 0.1], [(0, 0, 10, 10), (12, 12, 22, 22)]), store)
    P.save(pred("c3", [], []), store)
    P.write_meta(store, {"config": "test"})
    thresholds = tmp_path / "thresholds.json"
    pp.save_thresholds(thresholds, {"thresholds": {c: {"score": 0.5, "mask": 0.5, "min_area": 5} for c in CELL_TYPES},
                                    "options": {"image_class_vote": True, "rescore": False}})
    return tmp_path, images, store, thresholds


def read_rows(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_submit_writes_a_valid_submission_with_empty_rows(setup, capsys):
    tmp, images, store, thresholds = setup
    out = tmp / "submission.csv"
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 0
    rows = read_rows(out)
    assert rows[0] == ["id", "predicted"]
    by_id = {}
    for image_id, predicted in rows[1:]:
        by_id.setdefault(image_id, []).append(predicted)
    assert by_id["b2"] == [""]  # no confident detection -> one empty row
    assert by_id["c3"] == [""]
    doc = pp.load_thresholds(thresholds)
    expected = pp.apply_predictions(P.load(store / "a1.npz"), doc["thresholds"], **doc["options"]).rles()
    assert by_id["a1"] == expected and len(expected) == 2
    assert validate_submission(out, images) == []
    assert main(["validate", str(out), "--images", str(images)]) == 0
    captured = capsys.readouterr()
    assert "score >= 0.500" in captured.err and "image_class_vote=True" in captured.err  # thresholds are logged


def test_submit_errors(setup, capsys):
    tmp, images, store, thresholds = setup
    out = tmp / "submission.csv"
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(images / "d4.png")
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 2
    assert "no predictions for 1 image(s)" in capsys.readouterr().err
    (images / "d4.png").unlink()
    bad = tmp / "bad.json"
    bad.write_text(json.dumps({"thresholds": {c: {"score": 0.5, "mask": 0.5} for c in CELL_TYPES}}))
    assert main(["submit", "--pred", str(store), "--thresholds", str(bad), "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 2
    assert "class 'shsy5y': missing key 'min_area'" in capsys.readouterr().err
    (images / "a1.png").unlink()
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 2
    assert "not in" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("free_dropped", [False, True])
def test_submit_applies_free_dropped_from_thresholds(setup, free_dropped):
    tmp, images, _, _ = setup
    store = tmp / "pred_free"
    # a1: a small high-scored mask (2 x 2 inside its window) over a big lower-scored one (12 x 12); min_area 5
    P.save(pred("a1", [0.9, 0.8], [(4, 4, 8, 8), (0, 0, 14, 14)]), store)
    P.save(pred("b2", [], []), store)
    P.save(pred("c3", [], []), store)
    thresholds = tmp / "free.json"
    pp.save_thresholds(thresholds, {"thresholds": {c: {"score": 0.5, "mask": 0.5, "min_area": 5} for c in CELL_TYPES},
                                    "options": {"free_dropped": free_dropped}})
    out = tmp / "submission_free.csv"
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-progress"]) == 0
    masks = [p for i, p in read_rows(out)[1:] if i == "a1"]
    assert len(masks) == 1
    area = sum(int(n) for n in masks[0].split()[1::2])
    assert area == (144 if free_dropped else 144 - 4)  # freed, the dropped small mask leaves its 4 px
    assert validate_submission(out, images) == []
