"""Tests of cellkit.postprocess: the four class-wise steps, both options, the fast crop form, thresholds files."""
from __future__ import annotations

import json

import numpy as np
import pytest

from cellkit import CELL_TYPES, rle
from cellkit import postprocess as pp
import postprocess_reference as ref
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
    out = ref.apply(["shsy5y"] * 3, [0.5, 0.49, 0.9], masks, thr(score=0.5))
    assert len(out) == 2
    assert out[0].sum() == 9 and out[0][9:12, 9:12].all()  # 0.9 first
    assert out[1][0:3, 0:3].all()


def test_step2_binarise_pixel_at_threshold_is_kept():
    m = np.zeros((H, W), dtype=np.float32)
    m[2, 2:6] = [0.3, 0.5, 0.7, 0.49]
    out = ref.apply(["cort"], [0.9], [m], thr(mask=0.5))
    assert len(out) == 1
    assert np.flatnonzero(out[0][2]).tolist() == [3, 4]
    assert out[0].sum() == 2


def test_step3_higher_score_keeps_the_overlap_in_any_input_order():
    a, b = box(0, 6, 0, 6), box(3, 9, 3, 9)
    for order in ((0, 1), (1, 0)):
        masks = [[a, b][i] for i in order]
        scores = [[0.9, 0.6][i] for i in order]
        out = ref.apply(["astro", "astro"], scores, masks, thr())
        assert len(out) == 2
        assert out[0].sum() == 36 and out[0][3:6, 3:6].all()  # the 0.9 mask, whole
        assert out[1].sum() == 36 - 9 and not out[1][3:6, 3:6].any()
        assert not (out[0] & out[1]).any()


def test_step4_mask_reduced_under_min_area_disappears():
    big, small = box(0, 6, 0, 6), box(4, 8, 4, 8)  # small: 16 px, 4 of them taken by big
    out = ref.apply(["cort", "cort"], [0.9, 0.8], [big, small], thr(min_area=13))
    assert len(out) == 1 and out[0].sum() == 36
    out = ref.apply(["cort", "cort"], [0.9, 0.8], [big, small], thr(min_area=12))  # area == min_area is kept
    assert len(out) == 2 and out[1].sum() == 12


def test_dropped_small_mask_still_took_its_pixels():
    # the seed's order: overlaps are removed before the area filter, so a mask dropped for its size keeps what it took
    hi, lo = box(0, 2, 0, 2), box(0, 6, 0, 6)
    out = ref.apply(["cort", "cort"], [0.9, 0.8], [hi, lo], thr(min_area=5))
    assert len(out) == 1 and out[0].sum() == 36 - 4


def test_free_dropped_leaves_the_pixels_of_a_dropped_mask_to_lower_masks():
    # the same small high-scored mask over a big low-scored one: dropped for its area, it no longer cuts the big one
    hi, lo = box(0, 2, 0, 2), box(0, 6, 0, 6)
    out = ref.apply(["cort", "cort"], [0.9, 0.8], [hi, lo], thr(min_area=5), free_dropped=True)
    assert len(out) == 1 and out[0].sum() == 36 and out[0][0:2, 0:2].all()
    # a kept mask still takes its pixels, whichever the option
    for free in (False, True):
        out = ref.apply(["cort", "cort"], [0.9, 0.8], [hi, lo], thr(min_area=4), free_dropped=free)
        assert [m.sum() for m in out] == [4, 32]


def test_free_dropped_cascades_down_the_score_order():
    # a (0.95) takes most of b (0.9): b's 4 px residual (col 5) is under min_area 5, so b is dropped. Claimed, that
    # residual also cuts c (0.8, cols 5-6) to 4 px and c is dropped; freed, c keeps its 8 px and is kept. d (0.7)
    # loses col 6 either way (to c, kept or not under the seed's order).
    a = box(0, 4, 0, 5)    # rows 0-3, cols 0-4: 20 px
    b = box(0, 4, 1, 6)    # rows 0-3, cols 1-5: residual col 5
    c = box(0, 4, 5, 7)    # rows 0-3, cols 5-6
    d = box(0, 6, 6, 12)   # rows 0-5, cols 6-11: 36 px, col 6 shared with c
    masks, scores = [a, b, c, d], [0.95, 0.9, 0.8, 0.7]
    claimed = ref.apply(["cort"] * 4, scores, masks, thr(min_area=5))
    assert [int(m.sum()) for m in claimed] == [20, 32]                 # a, d: b and c dropped
    freed = ref.apply(["cort"] * 4, scores, masks, thr(min_area=5), free_dropped=True)
    assert [int(m.sum()) for m in freed] == [20, 8, 32]                # a, c whole (b freed col 5), d
    assert freed[1][0:4, 5:7].all() and not freed[2][0:4, 6].any() and freed[2][4:6, 6].all()


def test_empty_residual_is_dropped_even_without_min_area():
    a = box(0, 4, 0, 4)
    out = ref.apply(["cort", "cort"], [0.9, 0.8], [a, a.copy()], thr(min_area=0))
    assert len(out) == 1


def test_thresholds_are_class_wise():
    masks = [box(0, 3, 0, 3), box(5, 8, 5, 8), box(9, 12, 0, 2)]
    t = thr(score=0.5, shsy5y={"score": 0.95}, cort={"min_area": 7})
    out = ref.apply(["shsy5y", "astro", "cort"], [0.9, 0.9, 0.9], masks, t)
    assert len(out) == 1 and out[0][5:8, 5:8].all()


# ------------------------------------------------------------------------------------------------ options
def test_vote_gives_every_instance_the_majority_class_thresholds():
    masks = [box(0, 2, 0, 2), box(0, 2, 4, 6), box(0, 2, 8, 10), box(6, 9, 6, 9)]
    classes = ["shsy5y", "shsy5y", "shsy5y", "astro"]
    t = thr(score=0.5, astro={"score": 0.95})
    own = ref.apply(classes, [0.9, 0.8, 0.7, 0.6], masks, t)
    voted = ref.apply(classes, [0.9, 0.8, 0.7, 0.6], masks, t, image_class_vote=True)
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
    plain = ref.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.3))
    rescored = ref.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.3), rescore=True)
    assert plain[0][3:6, 3:6].all() and plain[0].sum() == 36  # a first
    assert rescored[0][3:6, 3:6].all() and rescored[0].sum() == 36 and rescored[0][8, 8]  # b first
    only_b = ref.apply(["cort", "cort"], [0.8, 0.7], [a, b], thr(score=0.5), rescore=True)
    assert len(only_b) == 1 and only_b[0][8, 8]  # a's rescored 0.48 < 0.5


def test_rescore_mean_is_over_the_binarised_pixels_only():
    m = box(0, 4, 0, 4, 1.0)
    m[0, 0:4] = 0.55  # kept at 0.5: mean (12 x 1.0 + 4 x 0.55) / 16
    m[5, 5] = 0.1  # not kept, not averaged
    score = 0.9 * (12 + 4 * 0.55) / 16
    assert len(ref.apply(["cort"], [0.9], [m], thr(score=score - 1e-6), rescore=True)) == 1
    assert len(ref.apply(["cort"], [0.9], [m], thr(score=score + 1e-6), rescore=True)) == 0


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


OPTION_SETS = [{"image_class_vote": vote, "rescore": rescore, "free_dropped": free}
               for free in (False, True) for vote in (False, True) for rescore in (False, True)]


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: "-".join(k for k, v in o.items() if v) or "seed")
def test_crop_form_equals_full_form(options):
    pred = random_pred()
    t = thr(score=0.2, mask=0.45, min_area=4, astro={"mask": 0.6, "score": 0.4}, cort={"min_area": 20})
    full = ref.apply([CELL_TYPES[c] for c in pred.classes], pred.scores, [pred.full_prob(i) for i in range(len(pred))],
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


def test_free_dropped_changes_the_random_case():
    # the equivalence test above is only meaningful for free_dropped if that option changes its result
    pred = random_pred()
    t = thr(score=0.2, mask=0.45, min_area=4, astro={"mask": 0.6, "score": 0.4}, cort={"min_area": 20})
    claimed, freed = pp.apply_predictions(pred, t), pp.apply_predictions(pred, t, free_dropped=True)
    assert claimed.rles() != freed.rles()
    assert freed.areas.sum() > claimed.areas.sum()


def reference(pred, t, free_dropped):
    """An independent, plain full-image version of the four steps (own class, raw scores)."""
    names = [CELL_TYPES[c] for c in pred.classes]
    order = sorted(range(len(pred)), key=lambda i: (-float(pred.scores[i]), i))
    occupied = np.zeros(pred.shape, dtype=bool)
    out = []
    for i in order:
        c = t[names[i]]
        if float(pred.scores[i]) < c["score"]:
            continue
        mask = pred.full_prob(i) >= np.float32(c["mask"])
        residual = mask & ~occupied
        keep = residual.sum() >= max(c["min_area"], 1)
        if keep or not free_dropped:
            occupied |= mask
        if keep:
            out.append(residual)
    return out


@pytest.mark.parametrize("free_dropped", [False, True])
def test_fast_form_equals_independent_reference_on_random_images(free_dropped):
    rng = np.random.default_rng(7)
    differ = 0
    for seed in range(25):
        pred = random_pred(seed, n=int(rng.integers(1, 60)))
        t = {c: {"score": float(rng.choice([0.0, 0.3, 0.6])), "mask": float(rng.choice([0.3, 0.5, 0.7])),
                 "min_area": int(rng.choice([0, 5, 15, 40]))} for c in CELL_TYPES}
        kept = pp.apply_predictions(pred, t, free_dropped=free_dropped)
        expected = reference(pred, t, free_dropped)
        assert kept.rles() == [rle.encode(m) for m in expected], seed
        other = pp.apply_predictions(pred, t, free_dropped=not free_dropped)
        differ += kept.rles() != other.rles()
        # freed occupancy is the union of kept masks only, a subset of the claimed one: every mask kept when
        # dropped masks claim is kept when they are freed, with at least the same pixels
        claimed, freed = (other, kept) if free_dropped else (kept, other)
        freed_by_index = dict(zip(freed.indices.tolist(), freed.full_masks()))
        for i, m in zip(claimed.indices.tolist(), claimed.full_masks()):
            assert i in freed_by_index and not (m & ~freed_by_index[i]).any(), (seed, i)
    assert differ >= 5  # the option matters on these images


def test_crop_runs_touching_the_right_edge_do_not_merge_rows():
    crop = np.ones((3, 4), dtype=bool)
    starts, lengths, counts = pp.crops_runs([crop], np.array([[12, 2, 16, 5]]), W)
    full = np.zeros((H, W), dtype=bool)
    full[2:5, 12:16] = True
    s2, n2 = rle.encode_runs(full)
    assert counts.tolist() == [3] and np.array_equal(starts, s2) and np.array_equal(lengths, n2)


def test_no_instances():
    assert ref.apply([], [], [], thr()) == []
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
        ref.apply(["cort"], [0.9], [box(0, 2, 0, 2)], t)


def test_free_dropped_round_trips_through_thresholds_files(tmp_path):
    path = pp.save_thresholds(tmp_path / "t.json", {"thresholds": thr(min_area=5), "options": {"free_dropped": True}})
    doc = pp.load_thresholds(path)
    assert doc["options"]["free_dropped"] is True
    hi, lo = box(0, 2, 0, 2), box(0, 6, 0, 6)
    pred = InstancePredictions.from_full_masks("x", [2, 2], [0.9, 0.8], np.zeros((2, 4)), np.stack([hi, lo]))
    kept = pp.apply_predictions(pred, doc["thresholds"], **doc["options"])  # as `cellkit submit` calls it
    assert kept.areas.tolist() == [36]
    with pytest.raises(ValueError, match="unknown option 'free'"):
        pp.validate_options({"free": True})


def test_unknown_class_name_and_length_mismatch():
    with pytest.raises(ValueError, match="instance 0: unknown class 'hela'"):
        ref.apply(["hela"], [0.9], [box(0, 2, 0, 2)], thr())
    with pytest.raises(ValueError, match="lengths differ"):
        ref.apply(["cort"], [0.9, 0.8], [box(0, 2, 0, 2)], thr())


def test_thresholds_file_roundtrip_and_errors(tmp_path):
    doc = {"thresholds": thr(score=0.4, cort={"min_area": 30}), "options": {"rescore": True},
           "metric": {"before": {"mAP": 0.3}}}
    path = pp.save_thresholds(tmp_path / "thresholds.json", doc)
    back = pp.load_thresholds(path)
    assert back["thresholds"]["cort"] == {"score": 0.4, "mask": 0.5, "min_area": 30}
    assert back["options"] == {"image_class_vote": False, "rescore": True, "vote_min_score": 0.5,
                               "free_dropped": False}  # a file without the key: today's behaviour
    assert back["metric"] == {"before": {"mAP": 0.3}}
    assert [p.name for p in tmp_path.iterdir()] == ["thresholds.json"]  # no temporary file left

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"thresholds": {c: v for c, v in thr().items() if c != "cort"}}))
    with pytest.raises(ValueError, match=rf"{bad}: thresholds: missing class 'cort'"):
        pp.load_thresholds(bad)
    bad.write_text(json.dumps({"thresholds": thr(), "options": {"rescore": "yes"}}))
    with pytest.raises(ValueError, match="option 'rescore' must be true or false"):
        pp.load_thresholds(bad)
    bad.write_text(json.dumps({"thresholds": thr(), "options": {"free_dropped": 1}}))
    with pytest.raises(ValueError, match=rf"{bad}: options: option 'free_dropped' must be true or false, got 1"):
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
