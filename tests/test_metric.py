"""Tests of cellkit.metric (the competition metric) and ``cellkit score``."""
from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings, strategies as st
from scipy import sparse

from cellkit import metric, rle
from cellkit.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
SHAPE = (6, 10)  # tiny image: 60 pixels


@functools.lru_cache(maxsize=None)
def _bench_module():
    """benchmarks/bench_metric.py: home of the dense reference implementation and the perturbation."""
    spec = importlib.util.spec_from_file_location("bench_metric", REPO / "benchmarks" / "bench_metric.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mask_of(pixels, shape=SHAPE) -> np.ndarray:
    """bool mask with the given flat row-major pixel indices set."""
    m = np.zeros(shape[0] * shape[1], bool)
    m[list(pixels)] = True
    return m.reshape(shape)


def rle_of(pixels, shape=SHAPE) -> str:
    return rle.encode(mask_of(pixels, shape))


# ------------------------------------------------------------------------------------------- thresholds
def test_thresholds():
    assert metric.THRESHOLDS.shape == (10,)
    np.testing.assert_array_equal(metric.THRESHOLDS, [0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95])


# ------------------------------------------------------------------------------------------- IoU
def test_iou_from_indices_hand_made():
    a = np.arange(0, 10)  # 10 pixels
    b = np.arange(5, 15)  # 10 pixels, 5 shared with a
    c = np.arange(40, 44)
    iou = metric.iou_from_indices([a, c], [b, a, np.zeros(0, np.int64)])
    assert iou.shape == (2, 3) and iou.dtype == np.float64
    np.testing.assert_array_equal(iou, [[5 / 15, 1.0, 0.0], [0.0, 0.0, 0.0]])


def test_iou_with_overlapping_predictions_is_exact():
    # predictions that share pixels
    preds = [np.arange(0, 20), np.arange(10, 30), np.arange(15, 25), np.arange(0, 30)]
    truths = [np.arange(5, 25), np.arange(20, 40)]
    iou = metric.iou_from_indices(preds, truths)
    for i, p in enumerate(preds):
        for j, t in enumerate(truths):
            inter = np.intersect1d(p, t).size
            assert iou[i, j] == inter / np.union1d(p, t).size


def test_iou_matrix_of_2d_masks_matches_dense():
    # masks on several rows: the box prefilter and the run intersections of cellkit.geometry, against brute force
    from cellkit import geometry
    rng = np.random.default_rng(3)
    a = rng.random((12, 17, 23)) < 0.2
    b = np.concatenate([a[:4], rng.random((9, 17, 23)) < 0.1, np.zeros((1, 17, 23), bool)])
    a[5] = False
    got = geometry.iou_matrix(geometry.MaskRuns.from_masks(a), geometry.MaskRuns.from_masks(b))
    inter = np.einsum("ihw,jhw->ij", a.astype(np.int64), b.astype(np.int64))
    union = a.sum((1, 2))[:, None] + b.sum((1, 2))[None, :] - inter
    np.testing.assert_array_equal(got, np.divide(inter, union, out=np.zeros(inter.shape), where=union > 0))


def test_iou_empty_lists():
    assert metric.iou_from_indices([], [np.arange(3)]).shape == (0, 1)
    assert metric.iou_from_indices([np.arange(3)], []).shape == (1, 0)


# ------------------------------------------------------------------------------------------- precision
def test_precision_both_empty_is_one():
    np.testing.assert_array_equal(metric.precision_per_threshold(np.zeros((0, 0))), np.ones(10))
    np.testing.assert_array_equal(metric.score_image([], []), np.ones(10))
    np.testing.assert_array_equal(metric.score_image([""], [], SHAPE), np.ones(10))  # empty = no cell


def test_only_predictions_or_only_truths_is_zero():
    np.testing.assert_array_equal(metric.score_image([rle_of(range(5))], [], SHAPE), np.zeros(10))
    np.testing.assert_array_equal(metric.score_image([], [rle_of(range(5))], SHAPE), np.zeros(10))


def test_identical_masks_score_one():
    truths = [rle_of(range(0, 8)), rle_of(range(20, 35)), rle_of([50, 51, 59])]
    np.testing.assert_array_equal(metric.score_image(truths, truths, SHAPE), np.ones(10))
    np.testing.assert_array_equal(metric.score_image(truths[::-1], truths, SHAPE), np.ones(10))


def test_one_false_positive():
    truth = [rle_of(range(0, 8))]
    pred = truth + [rle_of(range(30, 40))]
    # TP 1, FP 1, FN 0 -> 1 / 2 at every threshold
    np.testing.assert_array_equal(metric.score_image(pred, truth, SHAPE), np.full(10, 0.5))


def test_one_false_negative_and_one_match():
    truth = [rle_of(range(0, 8)), rle_of(range(30, 40))]
    np.testing.assert_array_equal(metric.score_image(truth[:1], truth, SHAPE), np.full(10, 0.5))


@pytest.mark.parametrize("n_truth, n_pred, threshold_index", [(4, 3, 5), (20, 11, 1), (20, 13, 3), (10, 9, 8)])
def test_iou_exactly_at_a_threshold_is_not_a_match(n_truth, n_pred, threshold_index):
    shape = (5, 10)
    truth = [rle_of(range(n_truth), shape)]
    pred = [rle_of(range(n_pred), shape)]  # inside the truth: IoU = n_pred / n_truth exactly
    t = metric.THRESHOLDS[threshold_index]
    assert n_pred / n_truth == t  # the case really sits on the threshold
    precision = metric.score_image(pred, truth, shape)
    expected = (metric.THRESHOLDS < t).astype(float)  # match only strictly below the threshold
    np.testing.assert_array_equal(precision, expected)


def test_maximum_matching_beats_greedy():
    # truths t0 = A and t1 = A+B overlap (a near-duplicate annotation); p0 = A, p1 = A+C.
    # IoU(p0,t0) = 1, IoU(p0,t1) = IoU(p1,t0) = 10/18 = 0.556, IoU(p1,t1) = 10/26.
    # Greedy by best IoU takes (p0,t0) and leaves p1 unmatched; the maximum matching pairs (p0,t1), (p1,t0).
    a, b, c = range(0, 10), range(10, 18), range(20, 28)
    t0, t1 = rle_of(a), rle_of([*a, *b])
    p0, p1 = rle_of(a), rle_of([*a, *c])
    precision = metric.score_image([p0, p1], [t0, t1], SHAPE)
    # t=0.50, 0.55: TP 2 -> 2/2; t>=0.60: only (p0,t0) -> 1/(1+1+1)
    np.testing.assert_array_equal(precision, [1, 1] + [1 / 3] * 8)
    assert precision.mean() == pytest.approx((2 + 8 / 3) / 10)


def test_precision_from_an_iou_matrix_needs_matching():
    iou = np.array([[0.97, 0.6, 0.0],
                    [0.6, 0.0, 0.0],
                    [0.0, 0.0, 0.0]])
    expected = np.array([2, 2] + [1] * 8, float)  # TP
    expected = expected / (3 + 3 - expected)
    np.testing.assert_array_equal(metric.precision_per_threshold(iou), expected)
    np.testing.assert_array_equal(metric.precision_per_threshold(sparse.csr_matrix(iou)), expected)


def test_score_masks_with_arrays_and_strings():
    truth = [mask_of(range(0, 8)), mask_of(range(20, 35))]
    pred = np.stack([mask_of(range(0, 8)), mask_of(range(20, 34)), np.zeros(SHAPE, bool)])  # empty one ignored
    from_masks = metric.score_masks(pred, truth)
    from_strings = metric.score_masks(pred, [rle.encode(m) for m in truth])
    np.testing.assert_array_equal(from_masks, from_strings)
    # IoU 14/15 = 0.933: matches up to 0.90
    np.testing.assert_array_equal(from_masks, [1] * 9 + [1 / 3])


def test_score_image_names_the_bad_mask():
    with pytest.raises(ValueError, match="mask 1: .*odd number"):
        metric.score_image([rle_of([1]), "1 2 3"], [], SHAPE)


# ------------------------------------------------------------------------------------------- frames
def _truth_frame():
    rows = [("a", rle_of(range(0, 8)), "shsy5y"), ("a", rle_of(range(20, 35)), "shsy5y"),
            ("b", rle_of(range(40, 50)), "astro"), ("c", rle_of(range(0, 5)), "astro")]
    frame = pd.DataFrame(rows, columns=["id", "annotation", "cell_type"])
    frame["width"], frame["height"] = SHAPE[1], SHAPE[0]
    return frame


def test_score_frames_hand_made():
    truth = _truth_frame()
    pred = pd.DataFrame([("a", rle_of(range(0, 8))), ("a", rle_of(range(20, 35))),  # a: perfect
                         ("b", rle_of(range(40, 50))), ("b", "")],  # b: perfect, plus an empty row = no cell
                        columns=["id", "predicted"])  # c: absent -> 0
    result = metric.score_frames(truth, pred)
    assert result["n_images"] == 3
    assert result["mAP"] == pytest.approx(2 / 3)
    assert result["per_class"] == {"shsy5y": 1.0, "astro": 0.5, "cort": None}
    assert result["per_threshold"] == pytest.approx([2 / 3] * 10)
    per_image = result["per_image"]
    assert per_image["id"].tolist() == ["a", "b", "c"]
    assert per_image["score"].tolist() == [1.0, 1.0, 0.0]
    assert per_image["n_truth"].tolist() == [2, 1, 1] and per_image["n_pred"].tolist() == [2, 1, 0]


def test_image_without_truth_and_without_predictions_scores_one():
    truth = pd.DataFrame({"id": ["a", "e"], "annotation": [rle_of(range(3)), ""]})
    result = metric.score_frames(truth, pd.DataFrame({"id": ["a"], "predicted": [rle_of(range(3))]}))
    assert result["per_image"]["score"].tolist() == [1.0, 1.0]
    assert result["per_class"] == {"shsy5y": None, "astro": None, "cort": None}  # no cell_type column
    # an image without truth that gets a prediction scores 0
    result = metric.score_frames(truth, pd.DataFrame({"id": ["a", "e"], "predicted": [rle_of(range(3)), "1 2"]}))
    assert result["per_image"]["score"].tolist() == [1.0, 0.0]


def test_columns_are_accepted_either_way():
    truth = _truth_frame().rename(columns={"annotation": "predicted"})
    pred = _truth_frame()[["id", "annotation"]]
    assert metric.score_frames(truth, pred)["mAP"] == 1.0


def test_width_and_height_give_the_shape():
    truth = _truth_frame()
    truth["width"], truth["height"] = 10, 5  # 50 pixels: image b's mask 41..50 still fits
    pred = pd.DataFrame({"id": ["b"], "predicted": ["45 10"]})  # ends at pixel 54 > 50
    with pytest.raises(ValueError, match=r"predictions row 0, id b: .*past the image end \(50 pixels"):
        metric.score_frames(truth, pred)


def test_default_shape_without_size_columns():
    truth = pd.DataFrame({"id": ["a"], "annotation": ["366080 1"]})  # the last pixel of a 520x704 image
    assert metric.score_frames(truth, truth.rename(columns={"annotation": "predicted"}))["mAP"] == 1.0
    with pytest.raises(ValueError, match="past the image end"):
        metric.score_frames(pd.DataFrame({"id": ["a"], "annotation": ["366081 1"]}), truth)


def test_unknown_prediction_id_is_an_error():
    pred = pd.DataFrame({"id": ["a", "zz9"], "predicted": ["1 1", "1 1"]})
    with pytest.raises(ValueError, match="row 1: id 'zz9' is not in truth"):
        metric.score_frames(_truth_frame(), pred)


def test_bad_rle_names_row_and_id():
    truth = _truth_frame()
    truth.loc[2, "annotation"] = "5 3 1 1"
    with pytest.raises(ValueError, match=r"truth row 2, id b: RLE pair 1: unsorted"):
        metric.score_frames(truth, truth[["id", "annotation"]])


def test_missing_columns():
    with pytest.raises(ValueError, match="no 'annotation'"):
        metric.score_frames(pd.DataFrame({"id": ["a"], "x": [""]}), pd.DataFrame({"id": [], "predicted": []}))
    with pytest.raises(ValueError, match="no 'id'"):
        metric.score_frames(_truth_frame(), pd.DataFrame({"predicted": []}))


# ------------------------------------------------------------------------------------------- CSV + CLI
def _write(tmp_path, name, frame):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


def test_cli_json(tmp_path, capsys):
    truth = _write(tmp_path, "truth.csv", _truth_frame())
    pred = _write(tmp_path, "sub.csv", pd.DataFrame({"id": ["a", "b", "c"],
                                                     "predicted": [rle_of(range(0, 8)), "", ""]}))
    assert cli_main(["score", "--truth", str(truth), "--pred", str(pred), "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out)  # exactly one JSON object
    assert set(result) == {"mAP", "per_class", "per_threshold", "n_images"}
    assert result["n_images"] == 3 and len(result["per_threshold"]) == 10
    assert result["per_class"] == {"shsy5y": 0.5, "astro": 0.0, "cort": None}
    assert result["mAP"] == pytest.approx(0.5 / 3)


def test_cli_table_and_per_image(tmp_path, capsys):
    truth = _write(tmp_path, "truth.csv", _truth_frame())
    per_image = tmp_path / "out" / "per_image.csv"
    assert cli_main(["score", "--truth", str(truth), "--pred", str(truth), "--per-image", str(per_image)]) == 0
    out = capsys.readouterr().out
    assert "mAP 1.0000 over 3 images" in out and "cort" in out
    assert pd.read_csv(per_image)["score"].tolist() == [1.0, 1.0, 1.0]


def test_cli_errors_name_file_and_line(tmp_path, capsys):
    truth = _write(tmp_path, "truth.csv", _truth_frame())
    pred = _write(tmp_path, "sub.csv", pd.DataFrame({"id": ["a", "b"], "predicted": ["1 2", "3 x"]}))
    assert cli_main(["score", "--truth", str(truth), "--pred", str(pred)]) == 2
    err = capsys.readouterr().err
    assert f"{pred} line 3, id b: RLE token 'x' is not an integer" in err
    assert cli_main(["score", "--truth", str(tmp_path / "nope.csv"), "--pred", str(pred)]) == 2
    assert "not found" in capsys.readouterr().err


def test_read_csv_keeps_ids_as_strings(tmp_path):
    path = tmp_path / "sub.csv"
    path.write_text("id,predicted\n0012,\n0013,1 2\n")
    frame = metric.read_csv(path, "predictions")
    assert frame["id"].tolist() == ["0012", "0013"] and frame["predicted"].tolist() == ["", "1 2"]
    assert frame.index.tolist() == [2, 3]  # CSV line numbers


# ------------------------------------------------------------------------------------------- property: vs dense
@st.composite
def images(draw):
    """Random small image with overlapping truths and predictions (as mask strings)."""
    h, w = draw(st.integers(2, 8)), draw(st.integers(2, 8))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    rng = np.random.default_rng(seed)
    truths = [rng.random((h, w)) < rng.uniform(0.05, 0.6) for _ in range(draw(st.integers(0, 5)))]
    preds = []
    for t in truths:  # perturbed copies so that IoUs spread over the thresholds
        flip = rng.random((h, w)) < rng.uniform(0, 0.3)
        preds.append(t ^ flip)
    preds += [rng.random((h, w)) < 0.3 for _ in range(draw(st.integers(0, 3)))]
    enc = lambda ms: [rle.encode(m) for m in ms]  # noqa: E731
    return enc(preds), enc(truths), (h, w)


@given(images())
@settings(max_examples=200, deadline=None)
def test_metric_equals_dense_reference(case):
    pred, truth, shape = case
    bench = _bench_module()
    np.testing.assert_array_equal(metric.score_image(pred, truth, shape), bench.dense_score_image(pred, truth, shape))


# ------------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_truth_against_itself_is_one(real_train_csv):
    truth = metric.read_csv(real_train_csv, "truth")
    ids = truth["id"].drop_duplicates().iloc[::8]  # 49 images, all cell types
    subset = truth[truth["id"].isin(ids)]
    result = metric.score_frames(subset, subset)
    assert result["mAP"] == 1.0 and result["n_images"] == len(ids)
    assert all(v == 1.0 for v in result["per_class"].values())


@pytest.mark.realdata
def test_real_perturbed_images_match_dense_reference(real_train_csv):
    bench = _bench_module()
    truth = pd.read_csv(real_train_csv, dtype={"id": str})
    sizes = truth.groupby("id", sort=False).size()
    types = truth.drop_duplicates("id").set_index("id")["cell_type"]
    # the smallest image of each cell type and one of median size (the dense reference is slow)
    ids = [sizes[types == t].idxmin() for t in ("shsy5y", "astro", "cort")]
    ids.append((sizes - sizes.median()).abs().idxmin())
    subset = truth[truth["id"].isin(ids)]
    pred = bench.perturbed_predictions(subset, seed=3)
    result = metric.score_frames(subset, pred)
    dense = []
    for image_id in result["per_image"]["id"]:
        t = subset.loc[subset["id"] == image_id, "annotation"].tolist()
        p = pred.loc[pred["id"] == image_id, "predicted"].tolist()
        ours = metric.score_image(p, t)
        ref = bench.dense_score_image(p, t)
        np.testing.assert_array_equal(ours, ref)
        dense.append(ref.mean())
    np.testing.assert_array_equal(result["per_image"]["score"].to_numpy(), dense)
    assert 0 < result["mAP"] < 1
