"""Tests of cellkit.postprocess: the four class-wise steps, both options, the fast crop form, thresholds files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cellkit import CELL_TYPES, rle
from cellkit import postprocess as pp
from cellkit.predictions import InstancePredictions, quantize

H, W = 12, 16


def thr(score=0.5, mask=0.5, min_area=0, **per_class):
    """Thresholds with the same values for every class, some classes overridden by dicts."""
    out = {c: {"score": score, "mask": mask, "min_area": min_area} for c in CELL_TYPES}
    for name, values in per_class.items():
        out[name] = {**out[name], **values}
    return out


def box(y0, y1, x0, x1, value=1.0):
    m = np.zeros((H, W), dtype=np.float32)
    m[y0:y1, x0:x1] = value
    return m


# ------------------------------------------------------------------------------------------------ the four steps
def test_step1_score_filter_keeps_at_threshold_drops_under():
    masks = [box(0, 3, 0, 3), box(5, 8, 5, 8), box(9, 12, 9, 12)]
    out = pp.apply(["shsy5y"] * 3, [0.5, 0.49, 0.9], masks, thr(score=0.5))
    assert len(out) == 2
    assert out[0].sum() == 9 and out[0][9:12, 9:12].all()  # 0.9 first
    assert out[1][0:3, 0:3].all()


def test_step2_binarise_pixel_at_threshold_is_kept():
    m = np.zeros((H, W), dtype=np.float32)
    m[2, 2:6] = [0.3, 0.5, 0.7, 0.49]
    out = pp.apply(["cort"], [0.9], [m], thr(mask=0.5))
    assert len(out) == 1
    assert np.flatnonzero(out[0][2]).tolist() == [3, 4]
    assert out[0].sum() == 2


def test_step3_higher_score_keeps_the_overlap_in_any_input_order():
    a, b = box(0, 6, 0, 6), box(3, 9, 3, 9)
    for order in ((0, 1), (1, 0)):
        masks = [[a, b][i] for i in order]
        scores = [[0.9, 0.6][i] for i in order]
        out = pp.apply(["astro", "astro"], scores, masks, thr())
        assert len(out) == 2
        assert out[0].sum() == 36 and out[0][3:6, 3:6].all()  # the 0.9 mask, whole
        assert out[1].sum() == 36 - 9 and not out[1][3:6, 3:6].any()
        assert not (out[0] & out[1]).any()


def test_step4_mask_reduced_under_min_area_disappears():
    big, small = box(0, 6, 0, 6), box(4, 8, 4, 8)  # small: 16 px, 4 of them taken by big
    out = pp.apply(["cort", "cort"], [0.9, 0.8], [big, small], thr(min_area=13))
    assert len(out) == 1 and out[0].sum() == 36
    out = pp.apply(["cort", "cort"], [0.9, 0.8], [big, small], thr(min_area=12))  # area == min_area is kept
    assert len(out) == 2 and out[1].sum() == 12


def test_dropped_small_mask_still_took_its_pixels():
    # the seed's order: overlaps are removed before the area filter, so a mask dropped for its size keeps what it took
    hi, lo = box(0, 2, 0, 2), box(0, 6, 0, 6)
    out = pp.apply(["cort", "cort"], [0.9, 0.8], [hi, lo], thr(min_area=5))
    assert len(out) == 1 and out[0].sum() == 36 - 4


def test_empty_residual_is_dropped_even_without_min_area():
    a = box(0, 4, 0, 4)
    out = pp.apply(["cort", "cort"], [0.9, 0.8], [a, a.copy()], thr(min_area=0))
    assert len(out) == 1


def test_thresholds_are_class_wise():
    masks = [box(0, 3, 0, 3), box(5, 8, 5, 8), box(9, 12, 0, 2)]
    t = thr(score=0.5, shsy5y={"score": 0.95}, cort={"min_area": 7})
    out = pp.apply(["shsy5y", "astro", "cort"], [0.9, 0.9, 0.9], masks, t)
    assert len(out) == 1 and out[0][5:8, 5:8].all()


# ------------------------------------------------------------------------------------------------ options
def test_vote_gives_every_instance_the_majority_class_thresholds():
    masks = [box(0, 2, 0, 2), box(0, 2, 4, 6), box(0, 2, 8, 10), box(6, 9, 6, 9)]
    classes = ["shsy5y", "shsy5y", "shsy5y", "astro"]
    t = thr(score=0.5, astro={"score": 0.95})
    own = pp.apply(classes, [0.9, 0.8, 0.7, 0.6], masks, t)
    voted = pp.apply(classes, [0.9, 0.8, 0.7, 0.6], masks, t, image_class_vote=True)
    assert len(own) == 3  # the astro detection fails astro's 0.95
    assert len(voted) == 4  # voted shsy5y: 0.6 passes shsy5y's 0.5


def test_vote_class_confident_majority_ties_and_fallback():
    assert pp.vote_class([0, 1, 1, 2], [0.9, 0.6, 0.7, 0.95]) == 1
    assert pp.vote_class([0, 1, 1], [0.9, 0.2, 0.3]) == 0  # only confident detections vote
    assert pp.vote_class([0, 1], [0.3, 0.4]) == 1  # none confident: all vote, tie -> larger score sum
    assert pp.vote_class([2, 1], [0.6, 0.6]) == 1  # full tie -> lower id
    assert pp.vote_class([], []) is None


def test_rescore_changes_order_and_filter():
    a = box(0, 6, 0, 6, 0.6)  # score 0.8 x mean 0.6 = 0.48
    b = box(3, 9, 3, 9, 1.0)  # score 0.7 x mean 1.0 = 0.70
    plain = pp.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.3))
    rescored = pp.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.3), rescore=True)
    assert plain[0][3:6, 3:6].all() and plain[0].sum() == 36  # a first
    assert rescored[0][3:6, 3:6].all() and rescored[0].sum() == 36 and rescored[0][8, 8]  # b first
    only_b = pp.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.5), rescore=True)
    assert len(only_b) == 1 and only_b[0][8, 8]  # a's rescored 0.48 < 0.5


def test_rescore_mean_is_over_the_binarised_pixels_only():
    m = box(0, 4, 0, 4, 1.0)
    m[0, 0:4] = 0.55  # kept at 0.5: mean (12 x 1.0 + 4 x 0.55) / 16
    m[5, 5] = 0.1  # not kept, not averaged
    score = 0.9 * (12 + 4 * 0.55) / 16
    assert len(pp.apply(["cort"], [0.9], [m], thr(score=score - 1e-6), rescore=True)) == 1
    assert len(pp.apply(["cort"], [0.9], [m], thr(score=score + 1e-6), rescore=True)) == 0


# ------------------------------------------------------------------------------------------------ crop form
def random_pred(seed=0, n=40, shape=(48, 64)):
    rng = np.random.default_rng(seed)
    h_img, w_img = shape
    boxes, masks = [], []
    for _ in range(n):
        h, w = rng.integers(3, 16, 2)
        y0, x0 = rng.integers(0, h_img - h + 1), rng.integers(0, w_img - w + 1)
        yy, xx = np.mgrid[0:h, 0:w]
        r = np.sqrt(((yy - h / 2) / (h / 2.2)) ** 2 + ((xx - w / 2) / (w / 2.2)) ** 2)
        masks.append(quantize(1.0 / (1.0 + np.exp((r - 1.0) * rng.uniform(2, 10)))))
        boxes.append((x0, y0, x0 + w, y0 + h))
    return InstancePredictions("img", h_img, w_img, rng.integers(0, 3, n), rng.random(n),
                               np.array(boxes, dtype=np.float32), np.array(boxes), masks)


@pytest.mark.parametrize("options", [{}, {"rescore": True}, {"image_class_vote": True},
                                     {"image_class_vote": True, "rescore": True}])
def test_crop_form_equals_full_form(options):
    pred = random_pred()
    t = thr(score=0.2, mask=0.45, min_area=4, astro={"mask": 0.6, "score": 0.4}, cort={"min_area": 20})
    full = pp.apply([CELL_TYPES[c] for c in pred.classes], pred.scores, [pred.full_prob(i) for i in range(len(pred))],
                    t, **options)
    kept = pp.apply_predictions(pred, t, **options)
    assert len(full) == len(kept) > 5
    for a, b in zip(full, kept.full_masks()):
        assert np.array_equal(a, b)
    assert kept.rles() == [rle.encode(m) for m in full]
    assert kept.areas.tolist() == [int(m.sum()) for m in full]
    for (s, n), m in zip(kept.runs(), full):
        s2, n2 = rle.encode_runs(m)
        assert np.array_equal(s, s2) and np.array_equal(n, n2)
    flat = kept.indices_flat()
    assert all(np.array_equal(f, np.flatnonzero(m)) for f, m in zip(flat, full))


def test_crop_runs_touching_the_right_edge_do_not_merge_rows():
    crop = np.ones((3, 4), dtype=bool)
    starts, lengths, counts = pp.crops_runs([crop], np.array([[12, 2, 16, 5]]), W)
    full = np.zeros((H, W), dtype=bool)
    full[2:5, 12:16] = True
    s2, n2 = rle.encode_runs(full)
    assert counts.tolist() == [3] and np.array_equal(starts, s2) and np.array_equal(lengths, n2)


def test_no_instances():
    assert pp.apply([], [], [], thr()) == []
    empty = InstancePredictions("e", H, W, [], [], np.zeros((0, 4)), np.zeros((0, 4)), [])
    kept = pp.apply_predictions(empty, thr())
    assert len(kept) == 0 and kept.rles() == []


# ------------------------------------------------------------------------------------------------ validation, files
@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("astro"), "missing class 'astro'"),
    (lambda t: t["cort"].pop("min_area"), "class 'cort': missing key 'min_area'"),
    (lambda t: t["shsy5y"].update(score=1.5), "class 'shsy5y': key 'score' = 1.5 is out of range"),
    (lambda t: t["shsy5y"].update(score=-0.1), "class 'shsy5y': key 'score'"),
    (lambda t: t["astro"].update(mask=0.0), "class 'astro': key 'mask' = 0.0 is out of range"),
    (lambda t: t["astro"].update(mask=1.2), "class 'astro': key 'mask'"),
    (lambda t: t["cort"].update(min_area=-1), "class 'cort': key 'min_area'"),
    (lambda t: t["cort"].update(min_area=2.5), "class 'cort': key 'min_area'"),
    (lambda t: t["cort"].update(score="0.5"), "class 'cort': key 'score' must be a finite number"),
    (lambda t: t["cort"].update(score=True), "class 'cort': key 'score' must be a finite number"),
    (lambda t: t["cort"].update(extra=1), "class 'cort': unknown key 'extra'"),
    (lambda t: t.update(hela={}), "unknown class 'hela'"),
])
def test_invalid_thresholds_name_class_and_key(change, message):
    t = thr()
    change(t)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        pp.apply(["cort"], [0.9], [box(0, 2, 0, 2)], t)


def test_unknown_class_name_and_length_mismatch():
    with pytest.raises(ValueError, match="instance 0: unknown class 'hela'"):
        pp.apply(["hela"], [0.9], [box(0, 2, 0, 2)], thr())
    with pytest.raises(ValueError, match="lengths differ"):
        pp.apply(["cort"], [0.9, 0.8], [box(0, 2, 0, 2)], thr())


def test_thresholds_file_roundtrip_and_errors(tmp_path):
    doc = {"thresholds": thr(score=0.4, cort={"min_area": 30}), "options": {"rescore": True},
           "metric": {"before": {"mAP": 0.3}}}
    path = pp.save_thresholds(tmp_path / "thresholds.json", doc)
    back = pp.load_thresholds(path)
    assert back["thresholds"]["cort"] == {"score": 0.4, "mask": 0.5, "min_area": 30}
    assert back["options"] == {"image_class_vote": False, "rescore": True, "vote_min_score": 0.5}
    assert back["metric"] == {"before": {"mAP": 0.3}}
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temporary file left

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": {c: v for c, v in thr().items() if c != "cort"}}))
    with pytest.raises(ValueError, match=rf"{bad}: thresholds: missing class 'cort'"):
        pp.load_thresholds(bad)
    bad.write_text(json.dumps({"thresholds": thr(), "options": {"rescore": "yes"}}))
    with pytest.raises(ValueError, match="option 'rescore' must be true or false"):
        pp.load_thresholds(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="invalid JSON"):
        pp.load_thresholds(bad)
    bad.write_text(json.dumps(thr()))
    with pytest.raises(ValueError, match="missing key 'thresholds'"):
        pp.load_thresholds(bad)
    with pytest.raises(FileNotFoundError):
        pp.load_thresholds(tmp_path / "absent.json")
    with pytest.raises(ValueError, match="missing class"):
        pp.save_thresholds(tmp_path / "x.json", {"thresholds": {}})
    assert not (tmp_path / "x.json").exists()
