"""Tests of cellkit.fusion and cellkit.predict: ensembles of models x passes, and the inference signature.

Fusion maths on hand-made instances; ensembles with tiny randomly initialised models (those of test_tta) on 128x160
images; the signature's round trip predict -> search -> submit.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from cellkit import fusion, predict, predictions, rle, tta
from cellkit.cli import main
from cellkit.fusion import FusionSettings
from cellkit.modeling import load_model
from cellkit.predictions import InstancePredictions
from test_tta import H, W, make_image, make_run, tiny_cfg


# ------------------------------------------------------------------------------------------------ box merging
def boxes_t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def test_nms_merge_fuses_scores_over_groups():
    # box A found by both groups (0.9, 0.7), box B by group 0 only, box C (another class) overlapping A
    b = boxes_t([10, 10, 40, 40], [11, 10, 41, 40], [60, 60, 90, 90], [10, 10, 40, 40])
    s = torch.tensor([0.9, 0.7, 0.6, 0.5])
    c = torch.tensor([0, 0, 1, 2])
    g = torch.tensor([0, 1, 0, 1])
    out_b, out_s, out_c = fusion.nms_merge(b, s, c, g, 2, (100, 100), iou=0.5, max_dets=10, score="mean")
    got = {(int(k), round(float(v), 4)) for k, v in zip(out_c, out_s)}
    assert got == {(0, 0.8), (1, 0.3), (2, 0.25)}
    assert len(out_b) == 3 and torch.equal(out_b[out_c == 0][0], b[0])  # NMS keeps the pooled box itself
    _, max_s, max_c = fusion.nms_merge(b, s, c, g, 2, (100, 100), iou=0.5, max_dets=10, score="max")
    assert {(int(k), round(float(v), 4)) for k, v in zip(max_c, max_s)} == {(0, 0.9), (1, 0.6), (2, 0.5)}


def test_wbf_merge_averages_boxes():
    pytest.importorskip("ensemble_boxes")
    b = boxes_t([10, 10, 40, 40], [14, 10, 44, 40], [60, 60, 90, 90])
    s = torch.tensor([0.9, 0.3, 0.8])
    c = torch.tensor([0, 0, 1])
    g = torch.tensor([0, 1, 0])
    out_b, out_s, out_c = fusion.wbf_merge(b, s, c, g, 2, (100, 100), iou=0.55, max_dets=10)
    a = out_c == 0
    np.testing.assert_allclose(out_b[a][0].numpy(), [(0.9 * 10 + 0.3 * 14) / 1.2, 10, (0.9 * 40 + 0.3 * 44) / 1.2, 40],
                               atol=1e-3)
    np.testing.assert_allclose(out_s[a].numpy(), [0.6], atol=1e-5)        # mean 0.6, both groups agree
    np.testing.assert_allclose(out_s[out_c == 1].numpy(), [0.4], atol=1e-5)  # 0.8 x 1 of 2 groups


def test_fusion_settings_round_trip_and_errors():
    f = FusionSettings("wbf").resolved(0.5)
    assert f.iou == 0.55 and FusionSettings.from_dict(f.as_dict()) == f
    assert FusionSettings().resolved(0.6).iou == 0.6
    with pytest.raises(ValueError, match="mode 'x'"):
        FusionSettings("x")
    with pytest.raises(ValueError, match="thresholds.json: fusion score"):
        FusionSettings.from_dict({"mode": "nms", "score": "median"}, "thresholds.json")


# ------------------------------------------------------------------------------------------------ weighted mask fusion
def square_pred(image_id, entries):
    """Predictions of a 40x40 image: entries ``(class, score, (x0, y0, x1, y1), probability)``: a uniform crop."""
    classes, scores, boxes, windows, masks = [], [], [], [], []
    for c, s, (x0, y0, x1, y1), p in entries:
        classes.append(c)
        scores.append(s)
        boxes.append([x0, y0, x1, y1])
        windows.append([x0, y0, x1, y1])
        masks.append(predictions.quantize(np.full((y1 - y0, x1 - x0), p)))
    return InstancePredictions(image_id, 40, 40, classes, scores, np.array(boxes, np.float32).reshape(-1, 4),
                               np.array(windows, np.int32).reshape(-1, 4), masks)


def test_wmf_two_members_agreeing_give_one_averaged_instance():
    a = square_pred("x", [(0, 0.9, (5, 5, 15, 15), 0.8), (1, 0.6, (25, 25, 35, 35), 0.9)])
    b = square_pred("x", [(0, 0.3, (6, 5, 16, 15), 0.6)])
    fused = fusion.weighted_mask_fusion([a, b], iou=0.5)
    assert len(fused) == 2
    agreed = int(np.flatnonzero(fused.classes == 0)[0])
    assert fused.scores[agreed] == pytest.approx((0.9 + 0.3) / 2)
    assert fused.mask_boxes[agreed].tolist() == [5, 5, 16, 15]  # union of the windows
    prob = fused.full_prob(agreed)
    assert prob[10, 10] == pytest.approx((0.9 * 0.8 + 0.3 * 0.6) / 1.2, abs=1 / 255)
    assert prob[10, 5] == pytest.approx(0.9 * 0.8 / 1.2, abs=1 / 255)  # only member a covers column 5
    lone = int(np.flatnonzero(fused.classes == 1)[0])
    assert fused.scores[lone] == pytest.approx(0.6 / 2) and fused.scores[lone] < 0.6  # one of two members
    assert np.all(np.diff(fused.scores) <= 0)


def test_wmf_keeps_apart_other_classes_and_one_members_duplicates():
    a = square_pred("x", [(0, 0.9, (5, 5, 15, 15), 0.8), (0, 0.5, (5, 5, 15, 15), 0.8)])  # a duplicate within a
    b = square_pred("x", [(2, 0.7, (5, 5, 15, 15), 0.8)])                                    # same place, other class
    fused = fusion.weighted_mask_fusion([a, b], iou=0.5)
    assert sorted(fused.classes.tolist()) == [0, 0, 2]
    one = fusion.weighted_mask_fusion([a], iou=0.5)
    np.testing.assert_array_equal(one.scores, a.scores)
    assert all(np.array_equal(x, y) for x, y in zip(one.masks, a.masks))
    with pytest.raises(ValueError, match="different images"):
        fusion.weighted_mask_fusion([a, square_pred("y", [])])


# ------------------------------------------------------------------------------------------------ ensembles of tiny models
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs that held out fold 0 (different random inits) and one that held out fold 1."""
    base = tmp_path_factory.mktemp("runs")
    out = {}
    for name, fold, seed in (("a", 0, 0), ("b", 0, 1), ("c", 0, 2), ("f1", 1, 3)):
        run = base / f"run_{name}"
        run.mkdir()
        out[name] = make_run(run, fold, seed=seed)
    return out


def assert_same_predictions(p, q):
    assert len(p) == len(q) > 0
    np.testing.assert_array_equal(p.classes, q.classes)
    np.testing.assert_array_equal(p.scores, q.scores)
    np.testing.assert_array_equal(p.boxes, q.boxes)
    np.testing.assert_array_equal(p.mask_boxes, q.mask_boxes)
    assert all(np.array_equal(a, b) for a, b in zip(p.masks, q.masks))


@pytest.mark.parametrize("use_tta", [False, True])
def test_one_member_ensemble_equals_the_single_model(runs, use_tta):
    from cellkit.config import load_run_config

    cfg = load_run_config(runs["a"])
    single = tta.CellTTA(cfg, load_model(cfg, runs["a"] / "model_final.pth"), tta=use_tta)
    ens = predict.load_ensemble([runs["a"]], tta=use_tta)
    img = make_image(2)
    assert_same_predictions(ens.predict(img, "i"), single.predict(img, "i"))
    assert ens.signature["passes"]["n_passes"] == (4 if use_tta else 1)


def test_identical_members_give_the_single_model_back(runs):
    """Box-first fusion of a model with itself: same boxes, scores and (up to float summation) masks."""
    one = predict.load_ensemble([runs["a"]]).predict(make_image(1), "i")
    two = predict.load_ensemble([runs["a"], runs["a"]], weights=[runs["a"] / "model_final.pth"] * 2)
    pair = two.predict(make_image(1), "i")
    assert len(pair) == len(one) > 0
    np.testing.assert_allclose(pair.scores, one.scores, atol=1e-6)
    np.testing.assert_allclose(pair.boxes, one.boxes, atol=1e-4)
    diff = [np.abs(a.astype(int) - b.astype(int)).max() for a, b in zip(pair.masks, one.masks) if a.shape == b.shape]
    assert len(diff) == len(one) and max(diff) <= 1


@pytest.mark.parametrize("mode", ["nms", "wbf", "wmf"])
def test_ensemble_runs_each_backbone_once_per_pass(runs, mode):
    if mode == "wbf":
        pytest.importorskip("ensemble_boxes")
    ens = predict.load_ensemble([runs["a"], runs["b"], runs["c"]], tta=True, fusion=FusionSettings(mode))
    pred = ens.predict(make_image(0), "img")
    assert [m.passes_run for m in ens.members] == [4, 4, 4]
    assert 0 < len(pred) <= 20 and np.all(np.diff(pred.scores) <= 0)
    assert (pred.mask_boxes[:, 2] <= W).all() and (pred.mask_boxes[:, 3] <= H).all()
    assert ens.signature["fusion"]["mode"] == mode
    low = predict.load_ensemble([runs["a"], runs["b"]], tta=True, cache_features=False)
    low.predict(make_image(0), "img")
    assert [m.passes_run for m in low.members] == [8, 8]  # recomputed for the mask pass


def test_members_with_other_passes_are_refused(runs, tmp_path):
    from cellkit.config import load_run_config, save_config

    other = tmp_path / "other"
    other.mkdir()
    cfg = load_run_config(runs["b"])
    cfg.TEST.AUG.MIN_SIZES = (96,)
    save_config(cfg, other)
    (other / "model_final.pth").symlink_to(runs["b"] / "model_final.pth")
    with pytest.raises(ValueError, match="passes .* differ"):
        predict.load_ensemble([runs["a"], other], tta=True)


def test_expand_runs_globs(runs, tmp_path):
    base = runs["a"].parent
    found = predict.expand_runs([str(base / "run_*"), str(runs["a"])])
    assert [p.name for p in found] == ["run_a", "run_b", "run_c", "run_f1"]
    with pytest.raises(FileNotFoundError, match="matches no run directory"):
        predict.expand_runs([str(tmp_path / "nothing*")])


# ------------------------------------------------------------------------------------------------ the signature round trip
def cli(*args) -> int:
    return main([*map(str, args), "--no-progress"])


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """Competition-layout data: train/ (3 images of test_tta), train.csv (their blobs), folds.csv, test/."""
    from PIL import Image

    data = tmp_path_factory.mktemp("labelled")
    (data / "train").mkdir()
    (data / "test").mkdir()
    rows = []
    yy, xx = np.mgrid[:H, :W]
    for k, image_id in enumerate(["img_a", "img_b", "img_c"]):
        Image.fromarray(make_image(k)[:, :, 0]).save(data / "train" / f"{image_id}.png")
        for cy, cx, r in [(30, 40, 12), (80, 110, 18), (100, 30, 9)]:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r ** 2
            rows.append({"id": image_id, "annotation": rle.encode(mask), "width": W, "height": H,
                         "cell_type": ["shsy5y", "astro", "cort"][k]})
    pd.DataFrame(rows).to_csv(data / "train.csv", index=False)
    (data / "folds.csv").write_text("id,fold\nimg_a,0\nimg_b,1\nimg_c,0\n")
    Image.fromarray(make_image(5)[:, :, 0]).save(data / "test" / "t1.png")
    return data


def test_signature_round_trip_predict_search_submit(runs, labelled, tmp_path, capsys):
    oof = tmp_path / "oof"
    assert cli("predict", "--run", runs["a"], "--run", runs["b"], "--fold", 0, "--data", labelled, "--out", oof) == 0
    assert cli("predict", "--run", runs["f1"], "--fold", 1, "--data", labelled, "--out", oof) == 0
    meta = predictions.read_meta(oof)
    assert [len(s["members"]) for s in meta["sources"]] == [2, 1]
    thresholds = tmp_path / "thresholds.json"
    assert cli("search", "--pred", oof, "--truth", labelled / "train.csv", "--out", thresholds, "--workers", 1,
               "--score-grid", "0.1,0.3", "--mask-grid", "0.5", "--min-area-grid", "0", "--options", "seed") == 0
    doc = json.loads(thresholds.read_text())
    assert doc["inference"] == meta["signature"]
    assert doc["provenance"]["folds"] == [0, 1] and len(doc["provenance"]["weights"]) == 3

    # the test store made --like the thresholds (an ensemble of all three fold-0 models) passes the check
    test_pred = tmp_path / "test_pred"
    assert cli("predict", "--run", str(runs["a"].parent / "run_[abc]"), "--images", labelled / "test",
               "--out", test_pred, "--like", thresholds) == 0
    assert len(predictions.read_meta(test_pred)["sources"][0]["members"]) == 3
    capsys.readouterr()
    sub = tmp_path / "submission.csv"
    assert cli("submit", "--pred", test_pred, "--thresholds", thresholds, "--images", labelled / "test",
               "--out", sub) == 0
    assert "inference: passes min_sizes=[128]" in capsys.readouterr().err and sub.is_file()

    # a store made with TTA is refused (one line naming what differs), nothing written; the flag overrides
    tta_pred = tmp_path / "tta_pred"
    assert cli("predict", "--run", runs["a"], "--images", labelled / "test", "--out", tta_pred, "--tta") == 0
    capsys.readouterr()
    refused = tmp_path / "refused.csv"
    assert cli("submit", "--pred", tta_pred, "--thresholds", thresholds, "--images", labelled / "test",
               "--out", refused) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "passes min_sizes=[128] max_size=256 flip=False vs passes min_sizes=[128, 144] max_size=256 flip=True" in err
    assert not refused.exists()
    assert cli("submit", "--pred", tta_pred, "--thresholds", thresholds, "--images", labelled / "test",
               "--out", refused, "--allow-inference-mismatch") == 0
    assert "warning:" in capsys.readouterr().err and refused.is_file()
    # other fusion settings differ too
    wbf_like = {**doc, "inference": {**doc["inference"], "fusion": {"mode": "wbf", "iou": 0.55, "score": "mean"}}}
    (tmp_path / "wbf.json").write_text(json.dumps(wbf_like))
    assert cli("submit", "--pred", test_pred, "--thresholds", tmp_path / "wbf.json", "--images", labelled / "test",
               "--out", refused) == 2
    assert "fusion mode=wbf" in capsys.readouterr().err


def test_store_refuses_another_signature_and_other_models(runs, labelled, tmp_path, capsys):
    out = tmp_path / "store"
    assert cli("predict", "--run", runs["a"], "--fold", 0, "--data", labelled, "--out", out) == 0
    capsys.readouterr()
    assert cli("predict", "--run", runs["f1"], "--fold", 1, "--data", labelled, "--out", out,
               "--fusion", "wmf") == 2
    assert "fusion mode=nms" in capsys.readouterr().err
    assert cli("predict", "--run", runs["b"], "--fold", 0, "--data", labelled, "--out", out) == 2
    assert "made by other models" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["weights_two_runs", "like_and_tta", "like_without_signature", "fold_not_held_out"])
def test_predict_ensemble_errors_before_work(case, runs, labelled, tmp_path, capsys):
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"thresholds": {}, "options": {}}))
    args = {
        "weights_two_runs": ["--run", runs["a"], "--run", runs["b"], "--weights", runs["a"] / "model_final.pth",
                             "--images", labelled / "test"],
        "like_and_tta": ["--run", runs["a"], "--images", labelled / "test", "--like", legacy, "--tta"],
        "like_without_signature": ["--run", runs["a"], "--images", labelled / "test", "--like", legacy],
        "fold_not_held_out": ["--run", runs["a"], "--run", runs["f1"], "--fold", 0, "--data", labelled],
    }[case]
    out = tmp_path / "pred"
    assert cli("predict", *args, "--out", out) == 2
    expected = {"weights_two_runs": "--weights names one checkpoint", "like_and_tta": "either --like",
                "like_without_signature": "no inference signature", "fold_not_held_out": "not be out-of-fold"}[case]
    assert expected in capsys.readouterr().err
    assert not out.exists()


def test_legacy_store_signature_reads_as_nms_max():
    sig = predictions.store_signature({"tta": {"enabled": True, "min_sizes": [128, 144], "max_size": 256,
                                               "flip": True, "n_passes": 4}, "sources": []})
    assert sig["fusion"] == {"mode": "nms", "iou": None, "score": "max"}
    new = {"passes": {"min_sizes": [128, 144], "max_size": 256, "flip": True},
           "fusion": {"mode": "nms", "iou": 0.5, "score": "mean"}, "detections_per_image": 20}
    assert "score=max vs" in predictions.signature_difference(sig, new)
    assert predictions.signature_difference(new, dict(new)) is None


def test_fuse_stores_equals_predicting_with_wmf(runs, labelled, tmp_path):
    stores = []
    for name in ("a", "b"):
        store = tmp_path / f"store_{name}"
        assert cli("predict", "--run", runs[name], "--images", labelled / "train", "--out", store) == 0
        stores.append(store)
    fused = tmp_path / "fused"
    assert cli("fuse", "--pred", stores[0], "--pred", stores[1], "--out", fused) == 0
    direct = tmp_path / "direct"
    assert cli("predict", "--run", runs["a"], "--run", runs["b"], "--images", labelled / "train", "--out", direct,
               "--fusion", "wmf") == 0
    assert predictions.read_meta(fused)["signature"] == predictions.read_meta(direct)["signature"]
    for image_id in predictions.image_ids(direct):
        assert_same_predictions(predictions.load(fused / f"{image_id}.npz"),
                                predictions.load(direct / f"{image_id}.npz"))
    with pytest.raises(ValueError, match="at least two stores"):
        predict.fuse_stores([stores[0]], tmp_path / "x")
