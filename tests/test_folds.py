"""cellkit.folds and ``python -m cellkit folds``."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellkit import CELL_TYPES
from cellkit import folds as ckfolds
from cellkit.cli import main


def instances(n_per_type=12, per_sample=3, with_samples=True) -> pd.DataFrame:
    """An instance table: ``n_per_type`` images of each type, 2 mask rows per image, samples of ``per_sample``."""
    rows = []
    for t, cell_type in enumerate(CELL_TYPES):
        for i in range(n_per_type):
            image_id = f"{cell_type[:2]}{i:03d}"
            sample = {"sample_id": f"{cell_type}_{i // per_sample}"} if with_samples else {}
            rows += [{"id": image_id, "annotation": "1 1", "cell_type": cell_type, **sample}] * 2
    return pd.DataFrame(rows)


def test_stratified_grouped_and_seeded():
    train = instances()
    folds = ckfolds.make_folds(train, k=4, seed=1)
    assert list(folds.columns) == ["id", "cell_type", "fold", "sample_id"]
    assert len(folds) == 36 and folds["id"].is_unique and folds["id"].is_monotonic_increasing
    assert set(folds["fold"]) == {0, 1, 2, 3}
    # grouped: a sample never straddles folds
    assert (folds.groupby("sample_id")["fold"].nunique() == 1).all()
    # stratified: 4 samples of each type over 4 folds -> exactly one sample (3 images) of each type per fold
    counts = pd.crosstab(folds["fold"], folds["cell_type"])
    assert (counts.to_numpy() == 3).all()
    # seeded
    pd.testing.assert_frame_equal(folds, ckfolds.make_folds(train, k=4, seed=1))
    assert not folds["fold"].equals(ckfolds.make_folds(train, k=4, seed=2)["fold"])


def test_groups_by_image_without_sample_id():
    folds = ckfolds.make_folds(instances(n_per_type=10, with_samples=False), k=5, seed=0)
    assert list(folds.columns) == ["id", "cell_type", "fold"]
    counts = pd.crosstab(folds["fold"], folds["cell_type"])
    assert (counts.to_numpy() == 2).all()  # 10 images of each type, 5 folds, no groups to get in the way


def test_empty_sample_id_falls_back_to_image():
    train = instances(n_per_type=4, per_sample=4)
    train.loc[train["id"].isin(["sh000", "sh001"]), "sample_id"] = ""
    images = ckfolds.image_table(train)
    groups = dict(zip(images["id"], images["group"]))
    assert groups["sh000"] == "sh000" and groups["sh001"] == "sh001" and groups["sh002"] == "shsy5y_0"


def test_make_folds_errors():
    train = instances(n_per_type=2, per_sample=2)  # 3 sample groups
    with pytest.raises(ValueError, match="k must be an integer >= 2"):
        ckfolds.make_folds(train, k=1)
    with pytest.raises(ValueError, match="cannot make k=4 folds from 3 sample groups"):
        ckfolds.make_folds(train, k=4, source="x.csv")
    mixed = train.copy()
    mixed.loc[0, "cell_type"] = "cort"
    with pytest.raises(ValueError, match=r"image sh000 has rows with different cell_type values \['cort', 'shsy5y'\]"):
        ckfolds.make_folds(mixed, k=2)


def test_write_read_roundtrip_and_fold_ids(tmp_path):
    folds = ckfolds.make_folds(instances(), k=3, seed=0)
    path = ckfolds.write_folds(folds, tmp_path / "sub" / "folds.csv")
    assert [p.name for p in path.parent.iterdir()] == ["folds.csv"]  # no temp file left
    back = ckfolds.read_folds(path)
    assert back.attrs["k"] == 3
    pd.testing.assert_frame_equal(back, folds, check_dtype=False)
    val = ckfolds.fold_ids(back, 1, "val")
    train = ckfolds.fold_ids(back, 1, "train")
    assert set(val).isdisjoint(train) and sorted(val + train) == sorted(folds["id"])
    assert val == folds.loc[folds["fold"] == 1, "id"].tolist()
    with pytest.raises(ValueError, match="split must be one of train, val"):
        ckfolds.fold_ids(back, 1, "test")
    with pytest.raises(ValueError, match=r"fold 3 is not in the folds table \(folds: \[0, 1, 2\]\)"):
        ckfolds.fold_ids(back, 3, "val")


@pytest.mark.parametrize("text, message", [
    ("", "empty folds file"),
    ("id,cell_type\na,cort\n", r"missing column\(s\) fold"),
    ("id,fold\n", "no data rows"),
    ("id,fold\na,0\nb,x\n", "line 3: fold 'x' is not an integer >= 0"),
    ("id,fold\na,0\nb,-1\n", "line 3: fold '-1'"),
    ("id,fold\na,0\nb,1\na,1\n", "line 4: id a listed twice"),
    ("id,fold\na,0\nb,2\n", r"fold\(s\) \[1\] have no image"),
])
def test_read_folds_errors(tmp_path, text, message):
    path = tmp_path / "folds.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        ckfolds.read_folds(path)


def test_read_folds_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folds file"):
        ckfolds.read_folds(tmp_path / "folds.csv")


def write_train_csv(path, train: pd.DataFrame) -> None:
    train.assign(width=704, height=520)[["id", "annotation", "width", "height", "cell_type", "sample_id"]].to_csv(
        path, index=False)


def test_cli(tmp_path, capsys):
    csv = tmp_path / "train.csv"
    write_train_csv(csv, instances())
    out = tmp_path / "folds.csv"
    assert main(["folds", str(csv), "--k", "3", "--out", str(out), "--seed", "5"]) == 0
    assert "36 images in 3 folds" in capsys.readouterr().out
    folds = ckfolds.read_folds(out)
    pd.testing.assert_frame_equal(folds, ckfolds.make_folds(instances(), k=3, seed=5), check_dtype=False)
    first = out.read_bytes()
    assert main(["folds", str(csv), "--k", "3", "--out", str(out), "--seed", "5"]) == 0
    assert out.read_bytes() == first
    assert main(["folds", str(csv), "--k", "13", "--out", str(tmp_path / "f2.csv")]) == 2
    assert "cannot make k=13 folds from 12 sample groups" in capsys.readouterr().err
    assert not (tmp_path / "f2.csv").exists()
    assert main(["folds", str(tmp_path / "none.csv"), "--out", str(out)]) == 2
    assert "none.csv: no such file" in capsys.readouterr().err


@pytest.mark.realdata
def test_real_folds_every_fold_has_every_type(real_train_csv):
    from cellkit.data import read_train_csv

    folds = ckfolds.make_folds(read_train_csv(real_train_csv), k=5, seed=0)
    assert len(folds) == 392
    counts = pd.crosstab(folds["fold"], folds["cell_type"]).reindex(columns=list(CELL_TYPES))
    assert (counts.to_numpy() > 0).all()
    totals = counts.sum(axis=0).to_numpy()
    assert np.abs(counts.to_numpy() - totals / 5).max() <= 2  # stratified: each fold near a fifth of each type
