"""cellkit.synth and ``python -m cellkit synth``: layout, format, determinism, morphology, safe writes."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage

from cellkit import CELL_TYPES, SHAPE, rle
from cellkit import synth
from cellkit.cli import main
from cellkit.data import read_train_csv


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    """A 5-image set (two samples or more, every type at least once) with 2 test images."""
    out = tmp_path_factory.mktemp("synth") / "demo"
    synth.synth_dataset(out, 5, seed=7, n_test=2)
    return out


def test_layout_and_format(small_set):
    assert sorted(p.name for p in small_set.iterdir()) == [
        "sample_submission.csv", "synth.json", "test", "test_truth.csv", "train", "train.csv"]
    assert not list(small_set.parent.glob(".demo*"))  # temp folders are gone
    train = read_train_csv(small_set / "train.csv")  # the competition format, validated
    assert list(train.columns) == ["id", "annotation", "width", "height", "cell_type", "sample_id"]
    assert train["id"].nunique() == 5 and set(train["cell_type"]) == set(CELL_TYPES)
    assert (train.groupby("id")["cell_type"].nunique() == 1).all()  # one cell type per image
    assert (train.groupby("id")["sample_id"].nunique() == 1).all()
    assert train["sample_id"].nunique() < 5  # some sample holds several images
    assert (train.groupby("sample_id")["cell_type"].nunique() == 1).all()
    for image_id in train["id"].unique():
        with Image.open(small_set / "train" / f"{image_id}.png") as im:
            assert im.mode == "L" and im.size == (SHAPE[1], SHAPE[0])
    sub = pd.read_csv(small_set / "sample_submission.csv", keep_default_na=False)
    assert list(sub.columns) == ["id", "predicted"] and (sub["predicted"] == "").all()
    assert sorted(sub["id"]) == sorted(p.stem for p in (small_set / "test").iterdir())
    truth = read_train_csv(small_set / "test_truth.csv")
    assert set(truth["id"]) == set(sub["id"]) and set(truth["id"]).isdisjoint(train["id"])
    assert json.loads((small_set / "synth.json").read_text())["seed"] == 7


def test_masks_valid_nonempty_and_disjoint(small_set):
    train = read_train_csv(small_set / "train.csv")
    for _, group in train.groupby("id"):
        cover = np.zeros(SHAPE, dtype=np.int32)
        for s in group["annotation"]:
            mask = rle.decode(s)  # validates the string
            assert mask.any()
            cover += mask
        assert cover.max() == 1


def test_deterministic_per_seed(small_set, tmp_path):
    again = synth.synth_dataset(tmp_path / "again", 5, seed=7, n_test=2)
    for name in ["train.csv", "test_truth.csv", "sample_submission.csv", "synth.json"]:
        assert (again / name).read_bytes() == (small_set / name).read_bytes(), name
    for png in (small_set / "train").iterdir():
        assert (again / "train" / png.name).read_bytes() == png.read_bytes()
    other = synth.synth_dataset(tmp_path / "other", 5, seed=8, n_test=2)
    assert (other / "train.csv").read_bytes() != (small_set / "train.csv").read_bytes()


def elongation(mask: np.ndarray) -> float:
    """sqrt of the ratio of the pixel covariance's eigenvalues (1 = round)."""
    ys, xs = np.nonzero(mask)
    evals = np.linalg.eigvalsh(np.cov(np.stack([xs, ys])))
    return float(np.sqrt(evals[1] / max(evals[0], 1e-9)))


def test_morphologies_differ_as_in_the_real_data():
    stats = {}
    for cell_type in CELL_TYPES:
        image, labels = synth.generate_image(cell_type, np.random.default_rng(3))
        assert image.dtype == np.uint8 and image.shape == SHAPE and labels.shape == SHAPE
        areas = np.bincount(labels.ravel())[1:]
        assert (areas > 0).all()
        masks = [labels == k for k in range(1, min(labels.max(), 40) + 1)]
        stats[cell_type] = (len(areas), areas.mean(), np.median([elongation(m) for m in masks]))
        # cells are visible: a bright phase-contrast halo rings them
        fg = labels > 0
        ring = ndimage.binary_dilation(fg) & ~fg
        far = ~ndimage.binary_dilation(fg, iterations=6)
        assert image[ring].mean() - image[far].mean() > 5
    (n_sh, area_sh, el_sh), (n_as, area_as, _), (n_co, area_co, el_co) = (stats[t] for t in CELL_TYPES)
    assert n_sh >= 50 and n_sh > 2 * n_co and n_sh > 2 * n_as  # many small shsy5y
    assert area_as > 3 * area_co and area_co > area_sh  # large astro, small shsy5y
    assert el_sh > 1.8 and el_co < 1.5  # elongated shsy5y, round cort


def test_cells_touch():
    _, labels = synth.generate_image("shsy5y", np.random.default_rng(0))
    right = (labels[:, 1:] != labels[:, :-1]) & (labels[:, 1:] > 0) & (labels[:, :-1] > 0)
    assert right.sum() > 20


def test_label_rles_roundtrip():
    labels = np.zeros(SHAPE, dtype=np.int32)
    labels[5:9, 700:704] = 1
    labels[6:10, 0:3] = 2  # wraps past a row end in flat order next to cell 1
    labels[519, 703] = 3
    strings = synth.label_rles(labels)
    assert len(strings) == 3
    for k, s in enumerate(strings, start=1):
        np.testing.assert_array_equal(rle.decode(s), labels == k)


def test_refuses_to_overwrite(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()  # empty: fine
    synth.synth_dataset(out, 1, seed=0, n_test=0)
    first = (out / "train.csv").read_bytes()
    with pytest.raises(ValueError, match="folder is not empty; pass --force"):
        synth.synth_dataset(out, 1, seed=1, n_test=0)
    assert (out / "train.csv").read_bytes() == first
    (out / "stale.txt").write_text("x")
    synth.synth_dataset(out, 1, seed=1, n_test=0, force=True)
    assert not (out / "stale.txt").exists() and (out / "train.csv").read_bytes() != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        synth.synth_dataset(tmp_path / "file", 1)
    with pytest.raises(ValueError, match="--images >= 1"):
        synth.synth_dataset(tmp_path / "x", 0)


def test_cli(tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["synth", str(out), "--images", "2", "--seed", "4", "--test-images", "1"]) == 0
    assert "2 train images" in capsys.readouterr().out
    assert len(list((out / "test").iterdir())) == 1
    assert main(["synth", str(out), "--images", "2"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert main(["synth", str(out), "--images", "2", "--seed", "4", "--test-images", "1", "--force"]) == 0


def test_loads_as_detectron2_dicts(small_set):
    from cellkit.data import load_sartorius_dicts

    dicts = load_sartorius_dicts(small_set / "train.csv", small_set / "train")
    train = read_train_csv(small_set / "train.csv")
    assert len(dicts) == 5 and sum(len(d["annotations"]) for d in dicts) == len(train)
