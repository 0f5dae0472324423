"""cellkit.audit / ``cellkit audit``: label flags on hand-made masks, prediction flags, the score, cleanlab, files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellkit import audit as A
from cellkit import predictions as P
from cellkit import rle
from cellkit.cli import main

SHAPE = (40, 50)


def square(y0, x0, h, w, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[max(y0, 0):y0 + h, max(x0, 0):x0 + w] = True
    return m


def frame(masks, image_id="img", cell_type="cort", shape=SHAPE, start_row=0):
    """A train.csv-like frame (index = data rows) of ``masks`` (bool arrays, or "" for an empty annotation)."""
    rows = [{"id": image_id, "annotation": m if isinstance(m, str) else rle.encode(m), "width": shape[1],
             "height": shape[0], "cell_type": cell_type} for m in masks]
    return pd.DataFrame(rows, index=pd.RangeIndex(start_row, start_row + len(rows)))


def runs(masks, shape=SHAPE):
    return A.MaskRuns.from_rles([m if isinstance(m, str) else rle.encode(m) for m in masks], shape)


def random_masks(rng, n, shape=SHAPE):
    out = []
    for _ in range(n):
        h, w = rng.integers(2, 15, 2)
        y0, x0 = rng.integers(0, shape[0] - h), rng.integers(0, shape[1] - w)
        m = np.zeros(shape, bool)
        m[y0:y0 + h, x0:x0 + w] = rng.random((h, w)) > 0.25
        out.append(m)
    return out


# ------------------------------------------------------------------------------------------------ runs and pairs
def test_runs_areas_and_boxes_match_dense():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 30)
    wrap = np.zeros(SHAPE, bool)
    wrap[5, 47:] = True
    wrap[6, :3] = True  # one flat run that wraps from row 5 into row 6
    masks += [wrap, np.zeros(SHAPE, bool)]
    mr = runs(masks)
    assert mr.starts.size and np.any((mr.starts % SHAPE[1]) + mr.lengths > SHAPE[1])  # the wrapping run exists
    for k, m in enumerate(masks):
        assert mr.areas[k] == m.sum()
        if m.any():
            ys, xs = np.nonzero(m)
            assert mr.boxes[k].tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        else:
            assert mr.boxes[k].tolist() == [0, 0, 0, 0]
    assert mr.boxes[30].tolist() == [0, 5, 50, 7]
    np.testing.assert_array_equal(mr.union().reshape(SHAPE), np.any(masks, axis=0))


def test_pair_intersections_match_dense_and_box_prefilter_misses_nothing():
    rng = np.random.default_rng(1)
    masks = random_masks(rng, 40)
    mr = runs(masks)
    dense = np.stack(masks).reshape(len(masks), -1).astype(np.int64)
    inter = dense @ dense.T
    i, j = A.box_pairs(mr.boxes)
    assert (i < j).all()
    np.testing.assert_array_equal(A.pair_intersections(mr, mr, i, j), inter[i, j])
    candidate = np.zeros_like(inter, dtype=bool)
    candidate[i, j] = True
    upper = np.triu(np.ones_like(candidate), k=1)
    assert not (upper & (inter > 0) & ~candidate).any()  # every intersecting pair is a candidate
    other = runs(random_masks(rng, 25))
    oi, oj = A.box_pairs(mr.boxes, other.boxes)
    dense_b = np.stack([rle.decode(rle.runs_to_string(other.starts[other.indptr[k]:other.indptr[k + 1]],
                                                      other.lengths[other.indptr[k]:other.indptr[k + 1]]), SHAPE)
                        for k in range(len(other))]).reshape(len(other), -1).astype(np.int64)
    cross = dense @ dense_b.T
    np.testing.assert_array_equal(A.pair_intersections(mr, other, oi, oj), cross[oi, oj])
    assert cross.sum() == cross[oi, oj].sum()


# ------------------------------------------------------------------------------------------------ label flags
def test_identical_masks_are_duplicates_with_iou_1():
    a = square(5, 5, 8, 9)
    flags = A.label_flags(runs([a, square(20, 30, 6, 6), a]), min_area=1)
    assert flags.duplicate.tolist() == [[2, 0]] and flags.duplicate_iou.tolist() == [1.0]
    assert flags.overlap.size == 0 and flags.empty.size == 0 and flags.tiny.size == 0


def test_shifted_copy_is_overlap_not_duplicate():
    a, b = square(10, 10, 10, 10), square(10, 11, 10, 10)  # IoU 90 / 110 = 0.818, IoS 0.9
    flags = A.label_flags(runs([a, b]), min_area=1)
    assert flags.duplicate.size == 0
    assert flags.overlap.tolist() == [[1, 0]]  # same areas: the later one is flagged
    assert flags.overlap_iou[0] == pytest.approx(90 / 110) and flags.overlap_ios[0] == pytest.approx(0.9)


def test_contained_mask_overlaps_and_touching_cells_do_not():
    big, inner = square(5, 5, 20, 20), square(10, 10, 5, 5)
    left, right = square(30, 5, 6, 10), square(30, 14, 6, 10)  # share one column: IoS 6 / 60 = 0.1
    flags = A.label_flags(runs([inner, big, left, right]), min_area=1)
    assert flags.overlap.tolist() == [[0, 1]]  # the smaller (inner) is flagged, partner the big one
    assert flags.overlap_ios[0] == 1.0 and flags.overlap_iou[0] == pytest.approx(25 / 400)


def test_triplicate_flags_the_two_later_copies_against_the_first():
    a = square(3, 3, 5, 5)
    flags = A.label_flags(runs([a, a, a]), min_area=1)
    assert flags.duplicate.tolist() == [[1, 0], [2, 0]]
    assert flags.overlap.size == 0  # a duplicate is not also an overlap


def test_empty_and_tiny_masks():
    tiny, edge = square(1, 1, 2, 2), square(10, 10, 2, 5)  # 4 px < 10; exactly 10 px is not tiny
    flags = A.label_flags(runs(["", tiny, edge, square(20, 20, 8, 8)]), min_area=10)
    assert flags.empty.tolist() == [0] and flags.tiny.tolist() == [1]


def test_audit_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="duplicate_iou"):
        A.AuditSpec(duplicate_iou=1.5)
    with pytest.raises(ValueError, match="misplaced_iou"):
        A.AuditSpec(misplaced_iou=0.7)
    with pytest.raises(ValueError, match="missing cell type 'astro'"):
        A.AuditSpec(min_area={"shsy5y": 1, "cort": 1})
    with pytest.raises(ValueError, match="unknown key 'nope'"):
        A.AuditSpec(weights={"nope": 1.0})


def test_audit_spec_completes_its_weights_with_the_defaults():
    spec = A.AuditSpec(weights={"missed": 2})
    assert spec.weights == {**A.DEFAULT_WEIGHTS, "missed": 2.0} and isinstance(spec.weights["missed"], float)
    assert A.AuditSpec().weights == A.DEFAULT_WEIGHTS


# ------------------------------------------------------------------------------------------------ prediction flags
def _prediction_case():
    """Labels: 0 matched exactly, 1 shifted 4 px off its cell (misplaced, IoU 1/3), 2 without prediction (spurious).
    Predictions (score order): cell 0, a cell without label (missed), cell 1's true position, a detector duplicate
    of cell 0 (shares 7/8 of its pixels), a low-score blob."""
    labels = [square(2, 2, 8, 8), square(2, 24, 8, 8), square(28, 40, 8, 8)]
    preds = [square(2, 2, 8, 8), square(25, 5, 9, 9), square(2, 20, 8, 8), square(2, 3, 8, 8), square(30, 20, 5, 5)]
    scores = np.array([0.95, 0.9, 0.85, 0.7, 0.2])
    return labels, preds, scores


def test_prediction_flags_missed_spurious_misplaced():
    labels, preds, scores = _prediction_case()
    pf = A.prediction_flags(runs(labels), runs(preds), scores, confident_score=0.5)
    assert pf.confident.tolist() == [0, 1, 2]  # 3 is a detector duplicate of 0, 4 is not confident
    assert pf.missed.tolist() == [1] and pf.missed_iou.tolist() == [0.0] and pf.missed_label.tolist() == [-1]
    assert pf.spurious.tolist() == [2]
    assert pf.misplaced.tolist() == [1] and pf.label_best_iou[1] == pytest.approx(32 / 96)
    assert pf.label_best_pred.tolist() == [0, 2, -1] and pf.label_best_iou[0] == 1.0
    # a lower confidence bar: the low-score blob is a missed cell too
    pf = A.prediction_flags(runs(labels), runs(preds), scores, confident_score=0.1)
    assert pf.missed.tolist() == [1, 4]


def test_missed_needs_the_prediction_off_the_labels():
    """A prediction merging two touching labelled cells matches neither (IoU 100 / 210 each) but lies on labels
    (200 of its 210 pixels): the labels are misplaced, the prediction is not a missed cell."""
    labels = [square(5, 5, 10, 10), square(5, 15, 10, 10)]
    merged = [square(5, 5, 10, 21)]
    pf = A.prediction_flags(runs(labels), runs(merged), np.array([0.9]), confident_score=0.5)
    assert pf.missed.size == 0 and pf.spurious.size == 0 and pf.misplaced.tolist() == [0, 1]
    pf = A.prediction_flags(runs(labels), runs(merged), np.array([0.9]), confident_score=0.5, missed_coverage=0.99)
    assert pf.missed.tolist() == [0] and pf.missed_coverage[0] == pytest.approx(200 / 210)


# ------------------------------------------------------------------------------------------------ score
def test_image_score_formula():
    counts = {"n_labels": 20, "n_duplicate": 1, "n_overlap": 2, "n_empty": 0, "n_tiny": 1}
    label, pred = A.image_score(counts)
    assert label == pytest.approx((2 * 1 + 1 * 2 + 1) / 20) and np.isnan(pred)
    counts.update(n_missed=5, n_spurious=4, n_misplaced=2)
    label, pred = A.image_score(counts, noise_z=0.0)
    assert pred == pytest.approx(5 / 25 + 0.5 * 4 / 20 + 2 / 20)
    base = {"missed": 0.04, "spurious": 0.1, "misplaced": 0.2}
    _, pred = A.image_score(counts, baselines=base, noise_z=2.0)
    margin = 2 * np.sqrt(0.04 * 0.96 / 25)
    assert pred == pytest.approx(5 / 25 - 0.04 - margin + 0.5 * max(0.2 - 0.1 - 2 * np.sqrt(0.09 / 20), 0))
    assert A.excess(0.1, 0.2, 50) == 0.0 and A.excess(0.3, 0.0, 10) == pytest.approx(0.3)


def test_baselines_need_enough_images_of_a_type():
    rows = []
    for k in range(6):
        rows.append({"id": f"c{k}", "cell_type": "cort", "label_score": 0.0, "has_pred": True, "n_labels": 100,
                     "n_missed": 0, "missed_fraction": 0.0, "spurious_fraction": 0.1 + 0.01 * k,
                     "misplaced_fraction": 0.0})
    rows.append({"id": "a0", "cell_type": "astro", "label_score": 0.01, "has_pred": True, "n_labels": 100,
                 "n_missed": 0, "missed_fraction": 0.0, "spurious_fraction": 0.3, "misplaced_fraction": 0.0})
    rows.append({"id": "s0", "cell_type": "shsy5y", "label_score": 0.02, "has_pred": False, "n_labels": 100,
                 "n_missed": np.nan, "missed_fraction": np.nan, "spurious_fraction": np.nan,
                 "misplaced_fraction": np.nan})
    out = A.apply_baselines(pd.DataFrame(rows), noise_z=0.0).set_index("id")
    assert out.loc["c0", "spurious_baseline"] == pytest.approx(0.125)  # median of 0.10..0.15
    assert out.loc["c5", "pred_score"] == pytest.approx(0.5 * (0.15 - 0.125))
    assert out.loc["a0", "spurious_baseline"] == 0.0 and out.loc["a0", "score"] == pytest.approx(0.01 + 0.15)
    assert np.isnan(out.loc["s0", "pred_score"]) and out.loc["s0", "score"] == 0.02
    assert list(out.index[:2]) == ["a0", "s0"]


# ------------------------------------------------------------------------------------------------ audit
def _store(directory, image_id, masks, scores, shape=SHAPE, cls=2):
    probs = np.stack(masks).astype(np.float32) if masks else np.zeros((0, *shape), np.float32)
    boxes = np.array([[np.nonzero(m)[1].min(), np.nonzero(m)[0].min(), np.nonzero(m)[1].max() + 1,
                       np.nonzero(m)[0].max() + 1] for m in masks], np.float32).reshape(-1, 4)
    P.save(P.InstancePredictions.from_full_masks(image_id, [cls] * len(masks), scores, boxes, probs), directory)


def test_audit_with_predictions_end_to_end(tmp_path, caplog):
    labels, preds, scores = _prediction_case()
    a = frame(labels, "imgA")
    b = frame([square(3, 3, 7, 7), square(3, 3, 7, 7), ""], "imgB", start_row=3)
    table = pd.concat([a, b])
    _store(tmp_path / "store", "imgA", preds, scores)
    result = A.audit(table, pred_dir=tmp_path / "store", progress=False)
    assert "1 of 2 audited image(s) have no predictions" in caplog.text
    images = result.images.set_index("id")
    assert list(result.images.columns) == list(A.IMAGE_COLUMNS)
    assert images.loc["imgA", "flags"] == "missed:1 spurious:1 misplaced:1"
    assert images.loc["imgB", "flags"] == "duplicate:1 empty:1" and not images.loc["imgB", "has_pred"]
    assert images.loc["imgA", "n_confident"] == 3 and images.loc["imgA", "n_pred"] == 5
    assert 0.0 <= images.loc["imgA", "cleanlab_badloc"] <= 1.0 and np.isnan(images.loc["imgB", "cleanlab_badloc"])
    inst = result.instances
    assert list(inst.columns) == list(A.INSTANCE_COLUMNS)
    got = {(r.kind, r.id, None if pd.isna(r.row) else int(r.row), None if pd.isna(r.pred_index) else int(r.pred_index))
           for r in inst.itertuples()}
    assert got == {("missed", "imgA", None, 1), ("spurious", "imgA", 2, None), ("misplaced", "imgA", 1, 2),
                   ("duplicate", "imgB", 4, None), ("empty", "imgB", 5, None)}
    missed = inst[inst["kind"] == "missed"].iloc[0]
    assert (missed.x0, missed.y0, missed.x1, missed.y1) == (5, 25, 14, 34) and missed.area == 81
    assert missed.pred_score == pytest.approx(0.9)
    # 2 images of a type: no baseline yet, so the score is the plain formula (noise margin 0 at baseline 0)
    n = 3
    assert images.loc["imgA", "score"] == pytest.approx(1 / (n + 1) + 0.5 * 1 / n + 1 / n)
    assert result.summary["flags"]["missed"] == 1 and result.summary["n_with_pred"] == 1


def test_thresholds_file_sets_the_confidence_and_the_spec_overrides_it(tmp_path):
    from cellkit import postprocess

    labels, preds, scores = _prediction_case()
    _store(tmp_path / "store", "imgA", preds, scores)
    thresholds = {c: dict(v) for c, v in postprocess.SEED_THRESHOLDS.items()}
    thresholds["cort"]["score"] = 0.88  # cell 1's true position (0.85) is no longer confident
    path = postprocess.save_thresholds(tmp_path / "thresholds.json", {"thresholds": thresholds})
    result = A.audit(frame(labels, "imgA"), pred_dir=tmp_path / "store", thresholds=path, progress=False)
    assert result.images["flags"].iloc[0] == "missed:1 spurious:2" and result.summary["thresholds"] == str(path)
    spec = A.AuditSpec(confident_score=0.5)
    result = A.audit(frame(labels, "imgA"), pred_dir=tmp_path / "store", thresholds=path, spec=spec, progress=False)
    assert result.images["flags"].iloc[0] == "missed:1 spurious:1 misplaced:1"


def test_audit_without_cleanlab_keeps_every_flag(tmp_path, caplog, monkeypatch):
    import sys

    labels, preds, scores = _prediction_case()
    _store(tmp_path / "store", "imgA", preds, scores)
    for name in [m for m in sys.modules if m == "cleanlab" or m.startswith("cleanlab.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import cleanlab -> ImportError
    result = A.audit(frame(labels, "imgA"), pred_dir=tmp_path / "store", progress=False)
    assert "cleanlab is not installed" in caplog.text
    row = result.images.iloc[0]
    assert row["flags"] == "missed:1 spurious:1 misplaced:1" and np.isnan(row["cleanlab_badloc"])


def test_audit_image_subset_and_errors(tmp_path):
    table = pd.concat([frame([square(2, 2, 5, 5)], "a"), frame([square(2, 2, 5, 5)], "b", start_row=1)])
    assert A.audit(table, image_ids=["b"], progress=False).images["id"].tolist() == ["b"]
    with pytest.raises(ValueError, match="1 image id\\(s\\) to audit are not in it, e.g. 'zz'"):
        A.audit(table, image_ids=["zz"], progress=False)
    _store(tmp_path / "s", "stranger", [square(1, 1, 3, 3)], [0.9])
    with pytest.raises(ValueError, match="predictions of 1 image\\(s\\) that are not in truth, e.g. 'stranger'"):
        A.audit(table, pred_dir=tmp_path / "s", progress=False)
    bad = table.copy()
    bad.loc[1, "annotation"] = "5 3 1"
    with pytest.raises(ValueError, match="line 3 \\(id b\\): bad annotation: .*odd number of tokens"):
        A.audit(bad, progress=False)


# ------------------------------------------------------------------------------------------------ cleanlab
def _cleanlab_images(seed=0, n_images=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_images):
        n_lab, n_pred = int(rng.integers(2, 9)), int(rng.integers(2, 12))
        xy = rng.uniform(0, 60, (n_lab, 2))
        lab = np.concatenate([xy, xy + rng.uniform(4, 15, (n_lab, 2))], axis=1)
        take = rng.integers(0, n_lab, n_pred)
        pred = lab[take] + rng.normal(0, 2.0, (n_pred, 4))
        pred[:, 2:] = np.maximum(pred[:, 2:], pred[:, :2] + 1)
        probs = rng.uniform(0.3, 1.0, n_pred)
        probs[:2] = [0.97, 0.99]  # some above cleanlab's 0.95 threshold for overlooked boxes
        classes = np.where(rng.random(n_pred) < 0.2, 1, 2)
        out.append(A._CleanlabImage(lab, np.full(n_lab, 2), pred, classes, probs))
    return out


def test_cleanlab_scores_equal_cleanlab_own_functions():
    """The columns equal cleanlab's public box-score functions run on its own input formats (its pairwise loops)."""
    from cleanlab.object_detection import rank

    far = A._CleanlabImage(np.array([[0.0, 0, 10, 10], [30, 0, 40, 10]]), np.array([2, 2]),
                           np.array([[0.0, 0, 10, 10], [31, 1, 40, 10], [50, 50, 60, 60]]), np.array([2, 1, 2]),
                           np.array([0.99, 0.97, 0.98]))  # an overlooked box (off every label) and a swapped one
    images = _cleanlab_images() + [far]
    labels, predictions = A.cleanlab_format(images)
    original = rank._get_overlap_matrix
    expected = [rank.pool_box_scores_per_image(rank.compute_overlooked_box_scores(labels=labels,
                                                                                  predictions=predictions)),
                rank.pool_box_scores_per_image(rank.compute_badloc_box_scores(labels=labels,
                                                                              predictions=predictions)),
                rank.pool_box_scores_per_image(rank.compute_swap_box_scores(labels=labels, predictions=predictions,
                                                                            overlapping_label_check=False))]
    got = A.cleanlab_image_scores(images)
    assert rank._get_overlap_matrix is original  # cleanlab's module is left as it is
    assert (got[:, 0] < 1.0).any() and (got[:, 2] < 1.0).any()  # overlooked and swap boxes exist in these images
    for k in range(3):
        np.testing.assert_allclose(got[:, k], expected[k], rtol=1e-9, atol=1e-12)
    for im in images:
        iou, similarity = A.cleanlab_matrices(im.label_boxes, im.pred_boxes)
        np.testing.assert_allclose(iou, rank._get_overlap_matrix(im.label_boxes, im.pred_boxes), rtol=1e-12,
                                   atol=1e-15)
        np.testing.assert_allclose((similarity - 0.9 * iou) / 0.1,
                                   rank._get_dist_matrix(im.label_boxes, im.pred_boxes), rtol=1e-9)
    assert A.cleanlab_image_scores([]).shape == (0, 3)


# ------------------------------------------------------------------------------------------------ files and CLI
def _write_truth(path, table):
    table.to_csv(path, index=False)
    return path


def test_cli_writes_both_csvs_atomically(tmp_path, capsys, monkeypatch):
    a = square(4, 4, 7, 7)
    truth = _write_truth(tmp_path / "train.csv", pd.concat([frame([a, a, square(20, 20, 2, 2)], "dup"),
                                                            frame([square(8, 8, 7, 7)], "ok", start_row=3)]))
    out = tmp_path / "audit"
    assert main(["audit", "--truth", str(truth), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "audited 2 images (0 with predictions)" in printed and "duplicate 1, tiny 1" in printed
    images = pd.read_csv(out / "audit.csv", dtype={"id": str})
    instances = pd.read_csv(out / "instances.csv", dtype={"id": str})
    assert list(images.columns) == list(A.IMAGE_COLUMNS) and list(instances.columns) == list(A.INSTANCE_COLUMNS)
    assert images["id"].tolist() == ["dup", "ok"] and images["score"].iloc[0] == pytest.approx((2 + 1) / 3)
    assert instances["kind"].tolist() == ["duplicate", "tiny"] and instances["row"].tolist() == [1, 2]
    assert instances["partner_row"].iloc[0] == 0 and pd.isna(instances["partner_row"].iloc[1])
    assert instances["iou"].iloc[0] == 1.0 and instances["area"].tolist() == [49, 4]
    assert sorted(p.name for p in out.iterdir()) == ["audit.csv", "audit.json", "instances.csv"]  # no temp files
    again = A.read_audit(out)
    assert again.images["flags"].tolist() == ["duplicate:1 tiny:1", ""] and again.summary["n_images"] == 2

    # a failure while writing leaves the previous files whole and no temporary file behind
    before = {name: (out / name).read_bytes() for name in ("audit.csv", "instances.csv")}

    def broken(self, path, *args, **kwargs):
        with open(path, "w") as fh:
            fh.write("half a ")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_csv", broken)
    with pytest.raises(OSError, match="disk full"):
        main(["audit", "--truth", str(truth), "--out", str(out), "--no-progress"])
    monkeypatch.undo()
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.iterdir()) == ["audit.csv", "audit.json", "instances.csv"]


def test_cli_errors_name_the_file(tmp_path, capsys):
    truth = _write_truth(tmp_path / "train.csv", frame([square(4, 4, 6, 6), square(20, 20, 4, 4)], "img"))
    text = truth.read_text().replace(rle.encode(square(20, 20, 4, 4)), "7")
    truth.write_text(text)
    assert main(["audit", "--truth", str(truth), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"{truth} line 3 (id img): bad annotation" in err
    assert not (tmp_path / "o").exists()
    assert main(["audit", "--truth", str(truth), "--out", str(tmp_path / "o"), "--min-area", "nope=3"]) == 2
    assert "--min-area: unknown class 'nope' (expected CELL_TYPE=PIXELS pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["audit", "--truth", str(truth), "--out", str(tmp_path / "o"), "--min-area", "astro"])
    assert "expected CELL_TYPE=PIXELS pairs" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ exclusion lists
def test_exclusion_ids_from_lists_and_audits(tmp_path):
    known = ["a", "b", "c", "d"]
    plain = tmp_path / "ids.txt"
    plain.write_text("# worst images\nb\n\nd  # partly annotated\nb\n")
    assert A.exclusion_ids(plain, known) == ["b", "d"]
    listed = tmp_path / "ids.csv"
    pd.DataFrame({"id": ["c", "a"], "why": ["x", "y"]}).to_csv(listed, index=False)
    assert A.exclusion_ids(listed, known) == ["c", "a"]
    audit_csv = tmp_path / "audit.csv"
    pd.DataFrame({"id": ["d", "a", "c", "b"], "score": [0.1, 0.5, 0.5, 0.0]}).to_csv(audit_csv, index=False)
    assert A.exclusion_ids(audit_csv, known, top=2) == ["a", "c"]  # ties keep file order
    assert A.exclusion_ids(audit_csv, known, top=10) == ["a", "c", "d", "b"]
    with pytest.raises(ValueError, match=f"{audit_csv}: an audit.csv lists every audited image"):
        A.exclusion_ids(audit_csv, known)
    with pytest.raises(ValueError, match=f"{plain}: --exclude-top needs an audit.csv"):
        A.exclusion_ids(plain, known, top=3)
    with pytest.raises(ValueError, match=f"{plain}: 1 excluded id\\(s\\) are not in the train CSV, e.g. 'd'"):
        A.exclusion_ids(plain, ["a", "b"])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no image id"):
        A.exclusion_ids(empty, known)
    with pytest.raises(FileNotFoundError, match="no such exclusion file"):
        A.exclusion_ids(tmp_path / "nope.txt", known)


# ------------------------------------------------------------------------------------------------ real data
# Images of the real train.csv that hold exactly duplicated annotations (pairs at mask IoU 1.0), with the number of
# duplicated rows, as an independent full-IoU-matrix check found them (benchmarks/bench_audit.py, RESULTS.md).
REAL_DUPLICATES = {"f653c5eec0f8": 9, "a7b1db2a42fc": 2, "b5afaf901478": 1, "bcf94f6bc975": 1, "ca5df17f6717": 1}
README_DUPLICATES = ("a9fc5e872671", "ce5d0de993bd")  # named by ../shared/data/README.md


@pytest.mark.realdata
def test_real_near_duplicate_images_are_flagged(real_train_csv):
    from cellkit.data import read_train_csv

    table = read_train_csv(real_train_csv)
    present = set(table["id"])
    readme = [i for i in README_DUPLICATES if i in present]
    result = A.audit(table, image_ids=list(REAL_DUPLICATES) + readme, progress=False)
    images = result.images.set_index("id")
    for image_id, n in REAL_DUPLICATES.items():
        assert images.loc[image_id, "n_duplicate"] == n, image_id
    dups = result.instances[result.instances["kind"] == "duplicate"]
    assert (dups["iou"] == 1.0).all() and (dups["row"] > dups["partner_row"]).all()
    for image_id in readme:  # absent from the current copy of the data (see RESULTS.md); checked if it comes back
        assert images.loc[image_id, "n_duplicate"] > 0, image_id


@pytest.mark.realdata
@pytest.mark.parametrize("image_id", README_DUPLICATES)
def test_readme_near_duplicate_images(real_train_csv, image_id):
    from cellkit.data import read_train_csv

    table = read_train_csv(real_train_csv)
    if image_id not in set(table["id"]):
        pytest.skip(f"{image_id} (named by the data README) is not in {real_train_csv}")
    assert A.audit(table, image_ids=[image_id], progress=False).images["n_duplicate"].iloc[0] > 0


# ------------------------------------------------------------------------------------------------ pictures
def test_audit_overlay_highlights_flagged_masks():
    from cellkit import viz

    image = np.full(SHAPE, 100, np.uint8)
    plain, flagged = square(2, 2, 6, 6), square(20, 20, 6, 6)
    out = viz.audit_overlay(image, [plain, flagged], {1: "duplicate"}, boxes=[("missed", (30, 2, 40, 10))])
    assert out.shape == (*SHAPE, 3) and out.dtype == np.uint8
    assert (out[4, 4] == 100).all()                                   # inside an unflagged mask: untouched
    assert tuple(out[2, 4]) == viz.OUTLINE_COLOR                      # its outline grey
    assert tuple(out[20, 22]) == viz.AUDIT_COLORS["duplicate"]        # a flagged mask's outline in its colour
    assert not (out[23, 23] == 100).all()                             # and its inside tinted
    assert tuple(out[2, 35]) == viz.AUDIT_COLORS["missed"] and (out[5, 35] == 100).all()  # a box: outline only
    with pytest.raises(ValueError, match="unknown audit kind 'odd'"):
        viz.audit_overlay(image, [plain], {0: "odd"})
    with pytest.raises(ValueError, match="mask 0 has shape"):
        viz.audit_overlay(image, [np.zeros((3, 3), bool)], {})


def test_plot_audit_draws_the_worst_images(tmp_path):
    from PIL import Image

    from cellkit import viz

    a = square(4, 4, 7, 7)
    table = pd.concat([frame([a, a], "dup"), frame([square(8, 8, 7, 7)], "ok", start_row=2)])
    (tmp_path / "img").mkdir()
    for image_id in ("dup", "ok"):
        Image.fromarray(np.full(SHAPE, 90, np.uint8)).save(tmp_path / "img" / f"{image_id}.png")
    result = A.audit(table, progress=False)
    fig = viz.plot_audit(table, tmp_path / "img", result, n=5)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == ["dup cort score 1.000\nduplicate:1"]  # only flagged images, highest score first
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["duplicate"]
    out = viz.save_figure(fig, tmp_path / "audit.png")
    assert out.stat().st_size > 1000
