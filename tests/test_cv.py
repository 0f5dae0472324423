"""Tests of cellkit.cv and ``python -m cellkit cv``: the naive / post-processed tables per fold and overall."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cellkit import CELL_TYPES, cv, fakepred, folds, metric, synth
from cellkit import postprocess as pp
from cellkit import predictions as P
from cellkit import search as S
from cellkit.cli import main

SHAPE = (96, 128)
LEFT_OUT = 1  # index (in sorted ids) of the truth image that gets no predictions


def tiny_truth(n_per_class=3, seed=0) -> pd.DataFrame:
    """A competition-format train table of small synthetic images (cellkit.synth's cell shapes)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in CELL_TYPES:
        for k in range(n_per_class):
            _, labels = synth.generate_image(name, rng, shape=SHAPE)
            for s in synth.label_rles(labels):
                rows.append((f"{name}{k}", s, SHAPE[1], SHAPE[0], name))
    return pd.DataFrame(rows, columns=["id", "annotation", "width", "height", "cell_type"])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as the chain leaves it: folds.csv, oof/ (all images but one), thresholds.json (searched)."""
    root = tmp_path_factory.mktemp("cv")
    truth = tiny_truth()
    data = root / "data"
    data.mkdir()
    truth.to_csv(data / "train.csv", index=False)
    out = root / "run"
    folds.write_folds(folds.make_folds(truth, k=3, seed=0), out / "folds.csv")
    ids = sorted(truth["id"].unique())
    predicted = [i for j, i in enumerate(ids) if j != LEFT_OUT]
    fakepred.generate(truth, out / "oof", seed=0, image_ids=predicted, progress=False)
    grid = {"score": [0.3, 0.5, 0.7], "mask": [0.4, 0.5, 0.6], "min_area": [0, 40, 120]}
    pp.save_thresholds(out / "thresholds.json", S.search(out / "oof", data / "train.csv", grid=grid, workers=1,
                                                         progress=False))
    return {"root": root, "data": data, "out": out, "truth": truth, "ids": ids, "predicted": predicted}


def report(run, **kw):
    out = run["out"]
    args = dict(pred_dir=out / "oof", truth_csv=run["data"] / "train.csv", thresholds_path=out / "thresholds.json",
                folds_csv=out / "folds.csv", progress=False)
    args.update(kw)
    return cv.cv_report(**args)


def independent_image_scores(run, thresholds, options) -> pd.DataFrame:
    """Per-image scores through a submission-like CSV frame and metric.score_frames (not cellkit.cv's path)."""
    rows = []
    for pred in P.iter_dir(run["out"] / "oof"):
        rles = pp.apply_predictions(pred, thresholds, **options).rles()
        rows += [(pred.image_id, s) for s in rles] or [(pred.image_id, "")]
    truth = run["truth"][run["truth"]["id"].isin(run["predicted"])]
    scored = metric.score_frames(truth, pd.DataFrame(rows, columns=["id", "predicted"]))["per_image"]
    fold_of = folds.read_folds(run["out"] / "folds.csv").set_index("id")["fold"]
    return scored.assign(fold=scored["id"].map(fold_of))


def expected_cells(frame: pd.DataFrame) -> dict:
    out = {"all": frame["score"].mean()}
    for name in CELL_TYPES:
        part = frame.loc[frame["cell_type"] == name, "score"]
        out[name] = part.mean() if len(part) else None
    return out


def assert_cells(got: dict, expected: dict):
    assert set(got) == set(cv.COLUMNS)
    for column, value in expected.items():
        if value is None:
            assert got[column] is None, column
        else:
            assert got[column] == pytest.approx(value, abs=1e-12), column


# ------------------------------------------------------------------------------------------------ the tables
def test_tables_equal_an_independent_metric_computation(run):
    doc = report(run)
    doc_thr = pp.load_thresholds(run["out"] / "thresholds.json")
    for setting, (thresholds, options) in {"naive": (pp.SEED_THRESHOLDS, {}),
                                           "post-processed": (doc_thr["thresholds"], doc_thr["options"])}.items():
        scored = independent_image_scores(run, thresholds, options)
        assert_cells(doc["overall"]["scores"][setting], expected_cells(scored))
        assert [e["fold"] for e in doc["per_fold"]] == sorted(scored["fold"].unique())
        for entry in doc["per_fold"]:
            part = scored[scored["fold"] == entry["fold"]]
            assert_cells(entry["scores"][setting], expected_cells(part))
            assert entry["n_images"]["all"] == len(part)
            assert entry["n_images"] == {"all": len(part), **{c: int((part["cell_type"] == c).sum())
                                                               for c in CELL_TYPES}}
    left_type = run["ids"][LEFT_OUT].rstrip("0123456789")  # ids are <cell type><k>
    assert doc["overall"]["n_images"] == {"all": 8, **{c: 3 - (c == left_type) for c in CELL_TYPES}}
    # the post-processing matters on these predictions, so the two rows really are different computations
    assert doc["overall"]["scores"]["post-processed"]["all"] > doc["overall"]["scores"]["naive"]["all"]


def test_naive_row_is_the_seed_and_agrees_with_the_search(run):
    doc = report(run)
    naive = doc["post_processing"]["naive"]
    assert naive["thresholds"] == pp.SEED_THRESHOLDS and naive["options"] == pp.DEFAULT_OPTIONS
    post = doc["post_processing"]["post-processed"]
    assert post["source"] == str(run["out"] / "thresholds.json")
    assert post["thresholds"] == pp.load_thresholds(run["out"] / "thresholds.json")["thresholds"]
    # the search's before/after are the same two figures over the same images
    search = pp.load_thresholds(run["out"] / "thresholds.json")["metric"]
    assert doc["overall"]["scores"]["naive"]["all"] == pytest.approx(search["before"]["mAP"], abs=1e-12)
    assert doc["overall"]["scores"]["post-processed"]["all"] == pytest.approx(search["after"]["mAP"], abs=1e-12)
    for name in CELL_TYPES:
        assert doc["overall"]["scores"]["naive"][name] == pytest.approx(search["before"]["per_class"][name])
    assert cv.search_mismatch(doc) is None


def test_truth_images_without_predictions_are_counted_not_scored(run):
    doc = report(run)
    left_out = run["ids"][LEFT_OUT]
    fold = int(folds.read_folds(run["out"] / "folds.csv").set_index("id").loc[left_out, "fold"])
    assert doc["truth_without_predictions"]["n"] == 1 and doc["truth_without_predictions"]["ids"] == [left_out]
    assert doc["overall"]["n_truth_without_predictions"] == 1
    assert {e["fold"]: e["n_truth_without_predictions"] for e in doc["per_fold"]} == \
        {f: int(f == fold) for f in range(3)}
    assert sum(e["n_images"]["all"] for e in doc["per_fold"]) == doc["overall"]["n_images"]["all"] == 8
    assert left_out not in {r["id"] for r in doc["per_image"]}
    assert doc["folds_without_predictions"] == []
    assert "truth images without predictions: 1 (left out, not scored 0)" in cv.format_tables(doc)


def test_summarise_by_hand():
    per_image = pd.DataFrame({"id": list("abcd"), "cell_type": ["cort", "cort", "astro", "cort"],
                              "fold": [0, 0, 0, 2], "naive": [0.1, 0.3, 0.5, 0.8], "post-processed": [0.2, 0.4, 0.6, 0.9]})
    got = cv.summarise(per_image, missing_folds=[0, None], all_folds=[0, 1, 2])
    assert [e["fold"] for e in got["per_fold"]] == [0, 2]
    f0 = got["per_fold"][0]
    assert f0["n_images"] == {"all": 3, "shsy5y": 0, "astro": 1, "cort": 2}
    assert f0["scores"]["naive"] == pytest.approx({"all": 0.3, "shsy5y": None, "astro": 0.5, "cort": 0.2})
    assert f0["n_truth_without_predictions"] == 1 and got["per_fold"][1]["n_truth_without_predictions"] == 0
    assert got["overall"]["scores"]["post-processed"]["cort"] == pytest.approx(0.5)
    assert got["overall"]["n_truth_without_predictions"] == 2
    assert got["folds_without_predictions"] == [1]


def test_signature_of_the_store_is_recorded(run, tmp_path):
    import shutil

    store = tmp_path / "oof"
    shutil.copytree(run["out"] / "oof", store)
    assert report(run, pred_dir=store)["predictions_signature"] is None  # fakepred's meta.json has none
    P.write_meta(store, {**P.read_meta(store), "signature": "abc123"})
    assert report(run, pred_dir=store)["predictions_signature"] == "abc123"


# ------------------------------------------------------------------------------------------------ errors
def test_errors_name_the_file_or_id(run, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"absent\.csv: no such truth file"):
        report(run, truth_csv=tmp_path / "absent.csv")
    with pytest.raises(FileNotFoundError, match=r"nothresholds\.json: no such thresholds file"):
        report(run, thresholds_path=tmp_path / "nothresholds.json")
    with pytest.raises(FileNotFoundError, match=r"nofolds\.csv: no such folds file"):
        report(run, folds_csv=tmp_path / "nofolds.csv")
    victim = run["predicted"][0]
    fewer = tmp_path / "fewer.csv"
    run["truth"][run["truth"]["id"] != victim].to_csv(fewer, index=False)
    with pytest.raises(ValueError, match=rf"predictions for 1 image\(s\) the truth does not know, e\.g\. '{victim}'"):
        report(run, truth_csv=fewer)
    table = folds.read_folds(run["out"] / "folds.csv")
    no_fold = tmp_path / "folds.csv"
    folds.write_folds(table[table["id"] != victim], no_fold)
    with pytest.raises(ValueError, match=rf"without a fold in the folds file, e\.g\. '{victim}'"):
        report(run, folds_csv=no_fold)


def test_cli_missing_truth(run, tmp_path, capsys):
    rc = main(["cv", str(run["out"]), "--truth", str(tmp_path / "absent.csv"), "--no-progress"])
    assert rc == 2 and "no such truth file" in capsys.readouterr().err
    rc = main(["cv", str(run["out"]), "--data", str(tmp_path), "--no-progress"])  # a data dir without train.csv
    assert rc == 2 and f"{tmp_path / 'train.csv'}: no such truth file" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # neither --truth nor --data
        main(["cv", str(run["out"])])
    assert "one of the arguments --truth --data is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the command
def test_cli_writes_cv_json_and_png_and_prints_markdown(run, tmp_path, capsys):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    assert main(["cv", str(out), "--data", str(run["data"]), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "cv.json").read_text())
    assert doc == json.loads(json.dumps(report(run, pred_dir=out / "oof", thresholds_path=out / "thresholds.json",
                                                folds_csv=out / "folds.csv")))
    assert doc["columns"] == ["all", "shsy5y", "astro", "cort"] and doc["settings"] == ["naive", "post-processed"]
    assert doc["inputs"]["truth"] == str(run["data"] / "train.csv")
    assert (out / "cv.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary file left
    # two aligned markdown tables: every row of a table as wide as its header
    tables = [block.splitlines() for block in printed.split("\n\n") if block.startswith("|")]
    assert len(tables) == 2
    for lines in tables:
        assert len({len(line) for line in lines}) == 1 and all(line.startswith("| ") for line in lines if line != lines[1])
        assert set(lines[1]) <= set("|-:")
    assert len(tables[0]) == 2 + 3 * 3  # header, rule, (images, naive, post-processed) x 3 folds
    assert f"| {doc['overall']['scores']['naive']['all']:.4f} |" in tables[1][3]
    assert "wrote" in printed and "cv.json" in printed


def test_cli_failing_plot_leaves_previous_files(run, tmp_path, monkeypatch):
    import shutil

    import matplotlib.figure

    out = tmp_path / "run"
    shutil.copytree(run["out"], out)
    (out / "cv.json").write_text("old json")
    (out / "cv.png").write_bytes(b"old png")

    def broken_savefig(self, fname, **kwargs):
        with open(fname, "wb") as fh:
            fh.write(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        main(["cv", str(out), "--truth", str(run["data"] / "train.csv"), "--no-progress"])
    assert (out / "cv.json").read_text() == "old json" and (out / "cv.png").read_bytes() == b"old png"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
