"""cellkit.pseudo / ``cellkit pseudo``: the masks of ``submit``, confidence screening, the output folder, errors."""
from __future__ import annotations

import csv
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cellkit import CELL_TYPES, fakepred, rle
from cellkit import postprocess as pp
from cellkit import predictions as P
from cellkit import pseudo
from cellkit.cli import main
from cellkit.data import read_train_csv

SIGNATURE = {"passes": {"min_sizes": [128], "max_size": 256, "flip": False, "n_passes": 1},
             "fusion": {"mode": "nms", "iou": 0.5, "score": "mean"}, "detections_per_image": 20}
H, W = 48, 64


def _ellipses(rng, n):
    yy, xx = np.mgrid[:H, :W]
    masks, taken = [], np.zeros((H, W), bool)
    while len(masks) < n:
        cy, cx = rng.integers(6, H - 6), rng.integers(6, W - 6)
        ay, ax = rng.integers(3, 7), rng.integers(3, 8)
        m = ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1
        if (m & taken).any():
            continue
        masks.append(m)
        taken |= m
    return masks


def _thresholds(path, image_class_vote=False, rescore=False, score=0.5, inference=SIGNATURE):
    doc = {"thresholds": {c: {"score": score, "mask": 0.5, "min_area": 4} for c in CELL_TYPES},
           "options": {"image_class_vote": image_class_vote, "rescore": rescore, "vote_min_score": 0.5}}
    if inference is not None:
        doc["inference"] = inference
    pp.save_thresholds(path, doc)
    return path


@pytest.fixture
def fake_pool(tmp_path):
    """Unlabeled images + a fakepred store of them (class confusion: some images have mixed classes)."""
    rng = np.random.default_rng(3)
    images = tmp_path / "pool"
    images.mkdir()
    rows = []
    for i in range(9):
        image_id = f"u{i:02d}"
        Image.fromarray(rng.integers(0, 255, (H, W), dtype=np.uint8)).save(images / f"{image_id}.png")
        rows += [{"id": image_id, "annotation": rle.encode(m), "width": W, "height": H, "cell_type": CELL_TYPES[i % 3]}
                 for m in _ellipses(rng, 5)]
    truth_csv = tmp_path / "truth.csv"
    pd.DataFrame(rows).to_csv(truth_csv, index=False)
    store = tmp_path / "pred"
    fakepred.generate(read_train_csv(truth_csv), store, fakepred.spec_for("realistic", class_confusion=0.3), seed=1,
                      progress=False)
    P.write_meta(store, {**P.read_meta(store), "signature": SIGNATURE})
    return tmp_path, images, store


def _submission_sets(path):
    out = {}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            out.setdefault(row["id"], set())
            if row["predicted"]:
                out[row["id"]].add(row["predicted"])
    return out


@pytest.mark.parametrize("vote,rescore", [(False, False), (True, True)])
def test_no_screen_writes_exactly_the_masks_of_submit(fake_pool, vote, rescore):
    tmp, images, store, = fake_pool
    thresholds = _thresholds(tmp / "thresholds.json", image_class_vote=vote, rescore=rescore)
    sub = tmp / "submission.csv"
    assert main(["submit", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(sub), "--no-progress"]) == 0
    out = tmp / "pl"
    assert main(["pseudo", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-screen", "--no-progress"]) == 0
    expected = {k: v for k, v in _submission_sets(sub).items() if v}  # images without a mask are dropped
    table = read_train_csv(out / "train.csv")  # cellkit's own reader accepts it
    got = {i: set(g["annotation"]) for i, g in table.groupby("id")}
    assert got == expected and sum(map(len, got.values())) > 20
    assert len(table) == sum(map(len, expected.values()))  # no duplicate rows
    assert list(table.columns) == list(pseudo.CSV_COLUMNS)
    assert (table["source"] == f"pseudo:{store}").all()
    assert table.groupby("id")["cell_type"].nunique().max() == 1  # one cell type per image
    for image_id in got:
        link = out / "train" / f"{image_id}.png"
        assert link.is_symlink() and link.resolve() == (images / f"{image_id}.png").resolve()
    summary = json.loads((out / "pseudo.json").read_text())
    assert summary["screen"] is None and summary["counts"]["kept"] == len(got)
    assert summary["inference"] == SIGNATURE


def test_no_screen_drops_only_images_without_masks(tmp_path):
    images, store = _hand_made(tmp_path)
    out = tmp_path / "pl"
    assert main(["pseudo", "--pred", str(store), "--thresholds", str(_thresholds(tmp_path / "t.json")),
                 "--images", str(images), "--out", str(out), "--no-screen", "--no-progress"]) == 0
    detail = json.loads((out / "pseudo.json").read_text())["images_detail"]
    assert {k for k, v in detail.items() if v["kept"]} == {"good", "mixed", "weak"}
    assert detail["empty"] == {**detail["empty"], "kept": False, "reason": "no_mask", "n_masks": 0}
    assert not (out / "train" / "empty.png").exists()


# ------------------------------------------------------------------------------------------------ screening
def _crop(y0, y1, x0, x1):
    c = np.zeros((y1 - y0, x1 - x0), dtype=np.uint8)
    c[1:-1, 1:-1] = 230
    return c


def _pred(image_id, scores, classes):
    windows = np.array([(2 + 10 * i, 2, 10 + 10 * i, 12) for i in range(len(scores))], dtype=np.int32).reshape(-1, 4)
    masks = [_crop(y0, y1, x0, x1) for x0, y0, x1, y1 in windows]
    return P.InstancePredictions(image_id, H, W, classes, scores, windows.astype(np.float32), windows, masks)


def _hand_made(tmp_path):
    images = tmp_path / "pool"
    images.mkdir()
    store = tmp_path / "pred"
    P.save(_pred("good", [0.95, 0.9, 0.55], [1, 1, 1]), store)  # astro, the 0.55 mask is under min_mask_score 0.6
    P.save(_pred("mixed", [0.9, 0.9, 0.85, 0.8], [0, 2, 0, 2]), store)  # share ~0.5
    P.save(_pred("weak", [0.56, 0.55, 0.58], [2, 2, 2]), store)  # mean 0.56 < 0.6
    P.save(_pred("empty", [0.3], [0]), store)  # nothing survives the thresholds (score 0.5)
    for image_id in ("good", "mixed", "weak", "empty"):
        Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(images / f"{image_id}.png")
    P.write_meta(store, {"signature": SIGNATURE})
    return images, store


def test_screening_drops_mixed_and_weak_images_and_weak_masks(tmp_path):
    images, store = _hand_made(tmp_path)
    thresholds = _thresholds(tmp_path / "t.json")
    out = tmp_path / "pl"
    before = sorted(p.name for p in images.iterdir())
    assert main(["pseudo", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--min-share", "0.8", "--min-mean-score", "0.6",
                 "--min-mask-score", "shsy5y=0.5,astro=0.6,cort=0.5", "--no-progress"]) == 0
    table = read_train_csv(out / "train.csv")
    assert set(table["id"]) == {"good"} and set(table["cell_type"]) == {"astro"}
    doc = pp.load_thresholds(thresholds)
    all_rles = pp.apply_predictions(P.load(store / "good.npz"), doc["thresholds"], **doc["options"]).rles()
    assert list(table["annotation"]) == all_rles[:2]  # the 0.55 mask is removed, order kept
    summary = json.loads((out / "pseudo.json").read_text())
    assert summary["format"] == pseudo.FORMAT
    assert summary["screen"] == {"min_share": 0.8, "min_mean_score": {c: 0.6 for c in CELL_TYPES},
                                 "min_mask_score": {"shsy5y": 0.5, "astro": 0.6, "cort": 0.5}}
    assert summary["postprocess"]["thresholds"] == doc["thresholds"]
    d = summary["images_detail"]
    assert (d["good"]["kept"], d["good"]["n_postprocessed"], d["good"]["n_masks"]) == (True, 3, 2)
    assert d["mixed"]["reason"] == "mixed_classes" and d["mixed"]["share"] == pytest.approx(1.75 / 3.45, abs=1e-6)
    assert d["weak"]["reason"] == "low_confidence" and d["weak"]["cell_type"] == "cort"
    assert d["empty"]["reason"] == "no_mask" and d["empty"]["n_detections"] == 1
    assert summary["counts"]["dropped_by_reason"] == {"no_mask": 1, "mixed_classes": 1, "low_confidence": 1,
                                                      "no_confident_mask": 0}
    assert summary["counts"]["masks"] == 2 and summary["counts"]["by_cell_type"]["astro"] == 1
    assert sorted(p.name for p in images.iterdir()) == before  # the source folder is untouched
    assert sorted(p.name for p in (out / "train").iterdir()) == ["good.png"]


def test_screen_image_and_vote_are_pure_and_classwise():
    assert pseudo.class_vote([], []) == (None, 0.0)
    assert pseudo.class_vote([0, 1], [0.5, 0.5]) == (0, 0.5)  # a tie goes to the lower id
    assert pseudo.class_vote([2, 2, 1], [0.9, 0.6, 0.5]) == (2, pytest.approx(1.5 / 2.0))
    s = pseudo.ScreenSettings(min_share=0.8, min_mean_score={"shsy5y": 0.9, "astro": 0.5, "cort": 0.5},
                              min_mask_score=0.7)
    assert pseudo.screen_image("a", [0, 0], [0.8, 0.8], s).reason == "low_confidence"  # shsy5y needs 0.9
    d = pseudo.screen_image("b", [1, 1, 1], [0.8, 0.8, 0.6], s)
    assert d.kept and d.cell_type == "astro" and d.keep.tolist() == [0, 1] and d.n_masks == 2
    assert pseudo.screen_image("c", [1, 1], [0.69, 0.6], pseudo.ScreenSettings(min_mean_score=0.5, min_mask_score=0.7)).reason == \
        "no_confident_mask"
    assert pseudo.screen_image("d", [1, 0], [0.9, 0.9], None).kept  # no screening: mixed images are kept
    with pytest.raises(ValueError, match="min_mean_score: class 'astro'"):
        pseudo.ScreenSettings(min_mean_score={"shsy5y": 0.5, "astro": 1.5, "cort": 0.5})
    with pytest.raises(ValueError, match="missing class 'cort'"):
        pseudo.parse_class_values("shsy5y=0.5,astro=0.5", "--min-mask-score")
    with pytest.raises(ValueError, match="--min-mask-score: malformed item"):
        pseudo.parse_class_values("shsy5y=0.5,astro", "--min-mask-score")
    assert pseudo.parse_class_values("0.3", "--x") == 0.3


# ------------------------------------------------------------------------------------------------ errors
def _run(store, thresholds, images, out, *extra):
    return main(["pseudo", "--pred", str(store), "--thresholds", str(thresholds), "--images", str(images),
                 "--out", str(out), "--no-progress", *extra])


def test_errors_missing_image_mismatch_and_outputs(tmp_path, capsys):
    images, store = _hand_made(tmp_path)
    thresholds = _thresholds(tmp_path / "t.json")
    out = tmp_path / "pl"
    (images / "weak.png").rename(tmp_path / "weak.png")  # a prediction without its image
    assert _run(store, thresholds, images, out) == 2
    assert "predictions for 1 image(s) not in" in capsys.readouterr().err and not out.exists()
    (tmp_path / "weak.png").rename(images / "weak.png")
    Image.fromarray(np.zeros((H, W), dtype=np.uint8)).save(images / "extra.png")  # an image without predictions
    assert _run(store, thresholds, images, out) == 2
    assert "no predictions for 1 image(s)" in capsys.readouterr().err and not out.exists()
    (images / "extra.png").unlink()
    other = dict(SIGNATURE, fusion={"mode": "wbf", "iou": 0.5, "score": "mean"})
    mismatched = _thresholds(tmp_path / "other.json", inference=other)
    assert _run(store, mismatched, images, out) == 2
    assert "fusion mode=wbf" in capsys.readouterr().err and not out.exists()
    assert _run(store, mismatched, images, out, "--allow-inference-mismatch") == 0
    assert "warning:" in capsys.readouterr().err
    assert _run(store, thresholds, images, out) == 2  # an earlier output is not replaced silently
    assert "already holds pseudo-labels" in capsys.readouterr().err
    assert _run(store, thresholds, images, out, "--overwrite", "--no-screen") == 0
    assert len(list((out / "train").iterdir())) == 3
    assert _run(store, thresholds, images, images / "pl") == 2  # never inside a source folder
    assert "source --images folder" in capsys.readouterr().err and not (images / "pl").exists()
    assert _run(store, thresholds, images, tmp_path / "x", "--min-share", "1.5") == 2
    assert "min_share: 1.5 is out of range" in capsys.readouterr().err
    assert _run(store, _thresholds(tmp_path / "strict.json", score=0.99), images, tmp_path / "none") == 2
    assert "no image kept out of 4" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_copy_instead_of_symlink(tmp_path):
    images, store = _hand_made(tmp_path)
    out = tmp_path / "pl"
    assert _run(store, _thresholds(tmp_path / "t.json"), images, out, "--copy") == 0
    copied = out / "train" / "good.png"
    assert copied.is_file() and not copied.is_symlink()
    assert copied.read_bytes() == (images / "good.png").read_bytes()
    assert json.loads((out / "pseudo.json").read_text())["counts"]["copied"] == 1
