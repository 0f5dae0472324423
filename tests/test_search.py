"""Tests of cellkit.search (exact against postprocess + metric; finds planted thresholds; errors) and fakepred."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cellkit import CELL_TYPES, fakepred, metric, rle
from cellkit import postprocess as pp
from cellkit import predictions as P
from cellkit import search as S
from cellkit.cli import main

REAL = Path(os.environ.get("CELLKIT_REAL_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def disks(rng, shape, n, r=(5.0, 8.0), overlap=True):
    """Competition RLEs of n random disks (non-overlapping unless ``overlap``)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    taken = np.zeros(shape, dtype=bool)
    out = []
    for _ in range(200):
        if len(out) == n:
            break
        cy, cx, rad = rng.uniform(8, h - 8), rng.uniform(8, w - 8), rng.uniform(*r)
        m = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
        if not overlap and (m & np.pad(taken, 0)).any():
            continue
        if not overlap:
            grown = (yy - cy) ** 2 + (xx - cx) ** 2 <= (rad + 3) ** 2
            if (grown & taken).any():
                continue
        taken |= m
        out.append(rle.encode(m))
    return out


def truth_frame(rng, shape, per_class=2, n=(3, 8), overlap=True, r=(5.0, 8.0)):
    rows = []
    for ci, name in enumerate(CELL_TYPES):
        for k in range(per_class):
            image_id = f"{name}{k:02d}"
            for s in disks(rng, shape, int(rng.integers(*n)), r, overlap):
                rows.append((image_id, s, shape[1], shape[0], name))
    return pd.DataFrame(rows, columns=["id", "annotation", "width", "height", "cell_type"])


# ------------------------------------------------------------------------------------------------ exactness
def test_sweep_equals_postprocess_plus_metric():
    rng = np.random.default_rng(0)
    shape = (48, 64)
    grid = S.make_grid(score=[0.2, 0.5, 0.8], mask=[0.35, 0.5, 0.65], min_area=[0, 15, 40])
    specs = fakepred.spec_for("realistic", class_confusion=0.4, fp_area=(5, 60), dup_rate=0.4)
    checked = 0
    for trial in range(12):
        cell_type = CELL_TYPES[trial % 3]
        truth = disks(rng, shape, int(rng.integers(0, 9)))  # disks overlap: truths may overlap
        pred = fakepred.fake_image(f"im{trial}", truth, cell_type, specs, seed=trial, shape=shape)
        tidx = [rle.runs_to_indices(*rle.parse(s, shape)) for s in truth]
        img = S.prepare_image(pred, tidx, cell_type, grid)
        for _ in range(3):
            t = {c: {"score": float(rng.choice(grid["score"])), "mask": float(rng.choice(grid["mask"])),
                     "min_area": int(rng.choice(grid["min_area"]))} for c in CELL_TYPES}
            vote, rescore = bool(rng.integers(2)), bool(rng.integers(2))
            c = int(rng.integers(3))
            res = S.image_scores(img, vote, rescore, t, grid, c)
            for k, s in enumerate(grid["score"]):
                for a, area in enumerate(grid["min_area"]):
                    t2 = {n: dict(v) for n, v in t.items()}
                    t2[CELL_TYPES[c]].update(score=s, min_area=area)
                    kept = pp.apply_predictions(pred, t2, image_class_vote=vote, rescore=rescore)
                    expected = metric.score_image(kept.rles(), truth, shape).mean()
                    assert res[k, a] == pytest.approx(expected, abs=1e-12), (trial, vote, rescore, c, s, area)
                    checked += 1
    assert checked == 12 * 3 * 9


def test_make_grid_adds_seed_defaults_and_validates():
    g = S.make_grid(score=[0.3, 0.7], mask=[0.4], min_area=[10, 5])
    assert g == {"score": [0.3, 0.5, 0.7], "mask": [0.4, 0.5], "min_area": [0, 5, 10]}
    with pytest.raises(ValueError, match="search grid 'mask'"):
        S.make_grid(mask=[0.0])
    with pytest.raises(ValueError, match="search grid 'min_area'"):
        S.make_grid(min_area=[-5])


# ------------------------------------------------------------------------------------------------ planted optimum
PLANTED = {"shsy5y": 0.4, "astro": 0.6, "cort": 0.5}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Predictions whose optimal thresholds are known: exact masks at the class's edge level, low-scored
    duplicates (score <= 0.25), high-scored but small false positives (<= 25 px) and cells of >= 78 px."""
    root = tmp_path_factory.mktemp("planted")
    rng = np.random.default_rng(3)
    truth = truth_frame(rng, (64, 96), per_class=2, n=(4, 7), overlap=False, r=(5.0, 7.0))
    csv = root / "train.csv"
    truth.to_csv(csv, index=False)
    common = dict(miss_rate=0.0, tp_score=(0.92, 1.0), shift=0.0, edge_width=5.0, edge_bias=0.0, bias_std=0.0,
                  dup_rate=0.6, dup_score_factor=(0.1, 0.25), dup_shift=4.0, fp_rate=0.6, fp_score=(0.6, 0.9),
                  fp_area=(4, 12), class_confusion=0.0)
    specs = {c: fakepred.FakeSpec(edge_level=PLANTED[c], **common) for c in CELL_TYPES}
    fakepred.generate(truth, root / "oof", specs, seed=1, progress=False)
    return root, csv, truth


def test_search_finds_planted_thresholds(planted):
    root, csv, truth = planted
    grid = {"score": [round(0.1 * i, 1) for i in range(1, 10)], "mask": [0.3, 0.4, 0.5, 0.6, 0.7],
            "min_area": [0, 10, 20, 40, 60, 100]}
    doc = S.search(root / "oof", csv, grid=grid, workers=1, progress=False)
    # the planted optimum for min_area: above every false positive's residual area, at most the smallest cell's
    no_area = {c: {**v, "min_area": 0} for c, v in doc["thresholds"].items()}
    truth_sets = {k: set(g["annotation"]) for k, g in truth.groupby("id")}
    fp_area = {c: 0 for c in CELL_TYPES}
    for pred in P.iter_dir(root / "oof"):
        kept = pp.apply_predictions(pred, no_area)
        name = truth.loc[truth["id"] == pred.image_id, "cell_type"].iat[0]
        for s, area in zip(kept.rles(), kept.areas):
            if s not in truth_sets[pred.image_id]:
                fp_area[name] = max(fp_area[name], int(area))
    cell_area = truth.assign(a=[rle.area(s, (64, 96)) for s in truth["annotation"]]).groupby("cell_type")["a"].min()
    for name in CELL_TYPES:
        t = doc["thresholds"][name]
        assert t["mask"] == PLANTED[name], (name, t)
        assert 0.25 < t["score"] <= 0.92, (name, t)
        assert 0 < fp_area[name] < t["min_area"] <= cell_area[name], (name, t, fp_area[name])
        assert doc["metric"]["after"]["per_class"][name] == pytest.approx(1.0)
        assert doc["metric"]["before"]["per_class"][name] < 0.9  # the seed's defaults keep the false positives
    assert doc["options"]["image_class_vote"] is False and doc["options"]["rescore"] is False  # ties keep the seed's
    free = doc["search"]["free_dropped"]
    assert [r["free_dropped"] for r in free["results"]] == [False, True]
    assert free["results"][0]["mAP"] == pytest.approx(free["sweep_mAP"], abs=1e-12)  # exact == sweep
    assert free["results"][1]["mAP"] <= free["results"][0]["mAP"] + 1e-12  # cannot beat 1.0: a tie keeps false
    assert free["chosen"] is False and doc["options"]["free_dropped"] is False
    assert doc["provenance"]["config"] == "fakepred"
    assert doc["search"]["n_images"] == 6 and doc["search"]["grid"]["score"][0] == 0.1
    # the chosen thresholds really score 1.0 through postprocess + metric
    rows = []
    for pred in P.iter_dir(root / "oof"):
        for s in pp.apply_predictions(pred, doc["thresholds"], **doc["options"]).rles():
            rows.append((pred.image_id, s))
    scored = metric.score_frames(truth, pd.DataFrame(rows, columns=["id", "predicted"]))
    assert scored["mAP"] == pytest.approx(1.0)


FRAGMENT = 12  # pixels of the high-scored fragment inside each cell


@pytest.fixture(scope="module")
def fragments(tmp_path_factory):
    """Predictions where freeing the pixels of dropped masks pays: every cell is predicted exactly (score 0.9) with a
    12-pixel fragment inside it scored higher (0.95, probability 1, so no score or pixel threshold removes it alone).
    min_area 30 drops the fragments; claimed, they still cut 12 px out of every cell (IoU ~0.94: precision 0 at
    IoU 0.95), freed, every cell is whole (mAP 1)."""
    root = tmp_path_factory.mktemp("fragments")
    shape = (64, 96)
    rng = np.random.default_rng(5)
    truth = truth_frame(rng, shape, per_class=2, n=(2, 4), overlap=False, r=(7.0, 8.5))  # < 240 px: IoU < 0.95
    csv = root / "train.csv"
    truth.to_csv(csv, index=False)
    store = root / "oof"
    for image_id, rows in truth.groupby("id"):
        cls = CELL_TYPES.index(rows["cell_type"].iat[0])
        masks, scores = [], []
        for s in rows["annotation"]:
            cell = rle.decode(s, shape).astype(bool)
            ys, xs = np.nonzero(cell)
            cy, cx = int(np.median(ys)), int(np.median(xs))
            frag = np.zeros(shape, dtype=bool)
            frag[cy - 1:cy + 2, cx - 2:cx + 2] = True  # 3 x 4 = 12 px
            assert (frag & cell).sum() == FRAGMENT and cell.sum() < 240  # IoU without the fragment < 0.95
            masks += [frag, cell]
            scores += [0.95, 0.9]
        pred = P.InstancePredictions.from_full_masks(image_id, [cls] * len(masks), scores,
                                                     np.zeros((len(masks), 4)), np.stack(masks))
        P.save(pred, store)
    P.write_meta(store, {"config": "test-fragments"})
    return root, csv, truth


def test_search_chooses_free_dropped_when_it_scores_better(fragments):
    root, csv, truth = fragments
    grid = {"score": [0.5], "mask": [0.5], "min_area": [0, 30]}
    doc = S.search(root / "oof", csv, grid=grid, workers=1, progress=False)
    assert all(doc["thresholds"][c]["min_area"] == 30 for c in CELL_TYPES)  # chosen by the sweep (claiming)
    free = doc["search"]["free_dropped"]
    by = {r["free_dropped"]: r["mAP"] for r in free["results"]}
    assert by[False] == pytest.approx(0.9) and by[False] == pytest.approx(free["sweep_mAP"])
    assert by[True] == pytest.approx(1.0)
    assert free["chosen"] is True and doc["options"]["free_dropped"] is True
    assert doc["metric"]["after"]["mAP"] == pytest.approx(1.0)
    # the chosen options reproduce that figure through the submission path
    rows = [(pred.image_id, r) for pred in P.iter_dir(root / "oof")
            for r in pp.apply_predictions(pred, doc["thresholds"], **doc["options"]).rles()]
    assert metric.score_frames(truth, pd.DataFrame(rows, columns=["id", "predicted"]))["mAP"] == pytest.approx(1.0)
    # without trying it, the option stays off and only its exact figure is recorded
    off = S.search(root / "oof", csv, grid=grid, workers=1, try_free_dropped=False, progress=False)
    assert off["options"]["free_dropped"] is False and off["metric"]["after"]["mAP"] == pytest.approx(0.9)
    assert [r["free_dropped"] for r in off["search"]["free_dropped"]["results"]] == [False]


def test_sweep_refuses_free_dropped(fragments):
    root, csv, truth = fragments
    with S.ThresholdSearch(root / "oof", truth, {"score": [0.5], "mask": [0.5], "min_area": [0]}, workers=1) as s:
        with pytest.raises(ValueError, match="free_dropped=False only"):
            s.evaluate(pp.SEED_THRESHOLDS, {"image_class_vote": False, "rescore": False, "free_dropped": True})
        with pytest.raises(ValueError, match="free_dropped=False only"):
            s.optimise({"image_class_vote": False, "rescore": False, "free_dropped": True})
        # exact() evaluates anything, and agrees with the sweep where both can
        t = {c: {"score": 0.5, "mask": 0.5, "min_area": 0} for c in CELL_TYPES}
        opts = {"image_class_vote": False, "rescore": False}
        exact = s.exact([(t, opts), (t, {**opts, "free_dropped": True})])
        assert exact.shape == (s.n_images, 2)
        assert np.allclose(exact[:, 0], s.evaluate(t, opts), atol=1e-12)
        assert np.array_equal(exact[:, 0], exact[:, 1])  # min_area 0 drops only empty residuals: nothing to free


def test_search_workers_agree(planted):
    root, csv, _ = planted
    grid = {"score": [0.2, 0.5, 0.8], "mask": [0.4, 0.5, 0.6], "min_area": [0, 20, 40]}
    one = S.search(root / "oof", csv, grid=grid, workers=1, progress=False)
    two = S.search(root / "oof", csv, grid=grid, workers=2, progress=False)
    assert one["thresholds"] == two["thresholds"] and one["metric"] == two["metric"]
    assert one["search"]["free_dropped"] == two["search"]["free_dropped"]


def test_search_cli_writes_thresholds_and_plot(planted, tmp_path, capsys):
    root, csv, _ = planted
    out = tmp_path / "thresholds.json"
    rc = main(["search", "--pred", str(root / "oof"), "--truth", str(csv), "--out", str(out),
               "--score-grid", "0.2:0.8:0.3", "--mask-grid", "0.4,0.5,0.6", "--min-area-grid", "0,20,40",
               "--workers", "1", "--no-progress"])
    assert rc == 0
    doc = pp.load_thresholds(out)
    assert set(doc) >= {"thresholds", "options", "metric", "search", "provenance"}
    assert doc["search"]["grid"]["score"] == [0.2, 0.5, 0.8]
    assert set(doc["search"]["curves"]) == set(CELL_TYPES)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "mAP" in printed and "free_dropped=True" in printed and "free_dropped=False" in printed
    assert doc["options"]["free_dropped"] is doc["search"]["free_dropped"]["chosen"]
    # --options seed: the seed's options only, free_dropped included
    assert main(["search", "--pred", str(root / "oof"), "--truth", str(csv), "--out", str(out), "--options", "seed",
                 "--score-grid", "0.5", "--mask-grid", "0.5", "--min-area-grid", "0", "--workers", "1",
                 "--no-progress"]) == 0
    doc = pp.load_thresholds(out)
    assert doc["options"] == pp.DEFAULT_OPTIONS
    assert len(doc["search"]["free_dropped"]["results"]) == 1


# ------------------------------------------------------------------------------------------------ errors
def test_search_errors(planted, tmp_path, capsys):
    root, csv, truth = planted
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .npz"):
        S.search(empty, csv, workers=1, progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="foreign file"):
        S.search(foreign, csv, workers=1, progress=False)
    fewer = truth[truth["id"] != "cort00"]
    fewer_csv = tmp_path / "fewer.csv"
    fewer.to_csv(fewer_csv, index=False)
    with pytest.raises(ValueError, match=r"predictions for 1 image\(s\) the truth does not know.*cort00"):
        S.search(root / "oof", fewer_csv, workers=1, progress=False)
    rc = main(["search", "--pred", str(empty), "--truth", str(csv), "--out", str(tmp_path / "t.json"),
               "--no-progress"])
    assert rc == 2 and "holds no .npz" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------------------------------------ fakepred
def test_fakepred_is_seeded_and_has_the_planted_structure(tmp_path):
    rng = np.random.default_rng(0)
    truth = disks(rng, (48, 64), 5, overlap=False)
    spec = {c: fakepred.FakeSpec(miss_rate=0.0, shift=0.0, bias_std=0.0, edge_level=0.4, dup_rate=0.0,
                                 fp_rate=0.0, class_confusion=0.0) for c in CELL_TYPES}
    a = fakepred.fake_image("x", truth, "astro", spec, seed=5, shape=(48, 64))
    b = fakepred.fake_image("x", truth, "astro", spec, seed=5, shape=(48, 64))
    c = fakepred.fake_image("x", truth, "astro", spec, seed=6, shape=(48, 64))
    assert len(a) == 5 and (a.classes == 1).all()
    assert np.array_equal(a.scores, b.scores) and not np.array_equal(a.scores, c.scores)
    got = sorted(rle.encode(a.full_prob(i) >= 0.4) for i in range(len(a)))
    assert got == sorted(truth)  # thresholding at the edge level gives the truth back
    assert all((a.full_prob(i) >= 0.6).sum() < (a.full_prob(i) >= 0.4).sum() for i in range(len(a)))  # soft edge
    with pytest.raises(ValueError, match="edge_level"):
        fakepred.FakeSpec(edge_level=1.0)
    with pytest.raises(ValueError, match="unknown fakepred knob"):
        fakepred.spec_for("realistic", nonsense=1)


def test_fakepred_cli(tmp_path, capsys):
    rng = np.random.default_rng(1)
    truth = truth_frame(rng, (48, 64), per_class=1, n=(2, 4))
    csv = tmp_path / "train.csv"
    truth.to_csv(csv, index=False)
    out = tmp_path / "oof"
    assert main(["fakepred", "--truth", str(csv), "--out", str(out), "--seed", "3", "--set", "fp_rate=1.0",
                 "--set", "fp_score=0.1,0.2", "--no-progress"]) == 0
    assert P.image_ids(out) == sorted(truth["id"].unique())
    meta = P.read_meta(out)
    assert meta["config"] == "fakepred" and meta["fakepred"]["seed"] == 3
    assert meta["fakepred"]["specs"]["cort"]["fp_score"] == [0.1, 0.2]
    first = {p.image_id: p.scores for p in P.iter_dir(out)}
    assert main(["fakepred", "--truth", str(csv), "--out", str(out), "--seed", "4", "--no-progress"]) == 2
    assert "another seed or spec" in capsys.readouterr().err
    assert all(len(s) for s in first.values())


@pytest.mark.realdata
def test_fakepred_and_search_on_real_truth_sample(tmp_path):
    train = REAL / "sartorius" / "train.csv"
    if not train.is_file():
        pytest.skip(f"real data not found at {train}")
    from cellkit.data import read_train_csv

    truth = read_train_csv(train)
    ids = [truth.loc[truth["cell_type"] == c, "id"].iloc[0] for c in CELL_TYPES]
    truth = truth[truth["id"].isin(ids)]
    fakepred.generate(truth, tmp_path / "oof", seed=0, progress=False)
    grid = {"score": [0.3, 0.5, 0.7], "mask": [0.4, 0.5, 0.6], "min_area": [0, 40, 100]}
    doc = S.search(tmp_path / "oof", truth, grid=grid, workers=1, progress=False)
    assert doc["metric"]["after"]["mAP"] >= doc["metric"]["before"]["mAP"]
    assert doc["search"]["n_images"] == 3


def test_provenance_from_predict_sources():
    _source_provenance = S._source_provenance
    meta = {"sources": [{"config": "run1/config.yaml", "weights": "run1/model_best.pth", "fold": 1},
                        {"config": "run0/config.yaml", "weights": "run0/model_best.pth", "fold": 0}],
            "tta": {"enabled": False}}
    got = _source_provenance(meta)
    assert got["folds"] == [0, 1]
    assert got["config"] == ["run1/config.yaml", "run0/config.yaml"]
    assert got["weights"] == ["run1/model_best.pth", "run0/model_best.pth"]
    one = _source_provenance({"sources": [{"config": "c.yaml", "weights": "w.pth", "fold": 2}]})
    assert one == {"config": "c.yaml", "weights": "w.pth", "folds": [2]}
    assert _source_provenance({"config": "fakepred"}) == {"config": "fakepred", "weights": None, "folds": None}
