"""Tests of cellkit.predictions: the per-image .npz store of instance predictions."""
from __future__ import annotations

import os

import numpy as np
import pytest

from cellkit import predictions as P
from cellkit.predictions import InstancePredictions


def _soft_crop(rng, h, w):
    """A smooth elliptic probability crop (sigmoid edge), as a mask head gives after upsampling."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = np.sqrt(((yy - h / 2) / (h / 2.5)) ** 2 + ((xx - w / 2) / (w / 2.5)) ** 2)
    return P.quantize(1.0 / (1.0 + np.exp((r - 1.0) * 8.0)))


def make_pred(image_id="img0", n=5, shape=(40, 50), seed=0, sizes=(3, 12)):
    rng = np.random.default_rng(seed)
    H, W = shape
    mask_boxes, masks = [], []
    for _ in range(n):
        h, w = rng.integers(sizes[0], sizes[1] + 1, 2)
        y0, x0 = rng.integers(0, H - h + 1), rng.integers(0, W - w + 1)
        mask_boxes.append((x0, y0, x0 + w, y0 + h))
        masks.append(_soft_crop(rng, h, w))
    boxes = np.array(mask_boxes, dtype=np.float32).reshape(-1, 4) + rng.normal(0, 0.5, (n, 4)).astype(np.float32)
    return InstancePredictions(image_id, H, W, rng.integers(0, 3, n), rng.random(n), boxes,
                               np.array(mask_boxes).reshape(-1, 4), masks)


def assert_same(a: InstancePredictions, b: InstancePredictions):
    assert (a.image_id, a.height, a.width) == (b.image_id, b.height, b.width)
    for name in ("classes", "scores", "boxes", "mask_boxes"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y), name
    assert len(a.masks) == len(b.masks)
    for m, k in zip(a.masks, b.masks):
        assert m.dtype == k.dtype == np.uint8 and np.array_equal(m, k)


def test_dtypes_coerced():
    p = make_pred()
    assert p.classes.dtype == np.int64 and p.scores.dtype == np.float32
    assert p.boxes.dtype == np.float32 and p.boxes.shape == (5, 4)
    assert p.mask_boxes.dtype == np.int32 and len(p) == 5 and p.shape == (40, 50)


def test_save_load_round_trip(tmp_path):
    p = make_pred(n=7)
    path = P.save(p, tmp_path / "preds")
    assert path == tmp_path / "preds" / "img0.npz"
    assert_same(p, P.load(path))
    with np.load(path, allow_pickle=False) as npz:  # documented layout
        assert str(npz["format"]) == P.FORMAT
        assert npz["mask_data"].dtype == np.uint8
        assert npz["mask_data"].size == sum(m.size for m in p.masks)
    assert [f.name for f in (tmp_path / "preds").iterdir()] == ["img0.npz"]  # no temp file left


def test_round_trip_empty_image(tmp_path):
    p = InstancePredictions("empty", 20, 30, [], [], np.zeros((0, 4)), np.zeros((0, 4)), [])
    q = P.load(P.save(p, tmp_path))
    assert len(q) == 0 and q.shape == (20, 30)
    assert_same(p, q)


def test_prob_and_full_prob():
    p = make_pred(n=3)
    for i in range(3):
        x0, y0, x1, y1 = p.mask_boxes[i]
        crop = p.prob(i)
        assert crop.dtype == np.float32 and crop.shape == (y1 - y0, x1 - x0)
        assert crop.min() >= 0 and crop.max() <= 1
        np.testing.assert_allclose(crop, p.masks[i] / 255.0, rtol=1e-6)
        full = p.full_prob(i)
        assert full.shape == (40, 50) and full.dtype == np.float32
        np.testing.assert_array_equal(full[y0:y1, x0:x1], crop)
        outside = full.copy()
        outside[y0:y1, x0:x1] = 0
        assert not outside.any()


def test_select_int_and_bool():
    p = make_pred(n=6)
    s = p.select([4, 1])
    assert len(s) == 2 and s.image_id == p.image_id
    np.testing.assert_array_equal(s.scores, p.scores[[4, 1]])
    np.testing.assert_array_equal(s.mask_boxes, p.mask_boxes[[4, 1]])
    assert s.masks[0] is p.masks[4]
    keep = p.scores > 0.5
    b = p.select(keep)
    assert len(b) == int(keep.sum())
    np.testing.assert_array_equal(b.classes, p.classes[keep])
    assert len(p.select(np.zeros(6, bool))) == 0
    with pytest.raises(ValueError, match="bool index"):
        p.select(np.ones(3, bool))
    with pytest.raises(ValueError, match="out of range"):
        p.select([6])


def test_from_full_masks_crops_to_nonzero_bbox():
    H, W = 30, 40
    probs = np.zeros((3, H, W), dtype=np.float32)
    probs[0, 5:9, 10:20] = 0.7
    probs[0, 12, 3] = 0.2  # extends the bbox to (3, 5) .. (20, 13)
    probs[1, 0:30, 39] = 1.0
    probs[2, 7, 7] = 0.001  # quantises to 0: empty window
    p = InstancePredictions.from_full_masks("f", [0, 1, 2], [0.9, 0.8, 0.1], np.zeros((3, 4)), probs)
    assert p.shape == (H, W)
    np.testing.assert_array_equal(p.mask_boxes, [[3, 5, 20, 13], [39, 0, 40, 30], [0, 0, 0, 0]])
    assert p.masks[2].shape == (0, 0)
    np.testing.assert_allclose(p.full_prob(0), probs[0], atol=0.5 / 255)
    np.testing.assert_allclose(p.full_prob(1), probs[1], atol=0.5 / 255)
    assert not p.full_prob(2).any()


def test_from_full_masks_bool_and_empty():
    m = np.zeros((2, 8, 9), bool)
    m[0, 1:3, 2:5] = True
    m[1, 4, 4] = True
    p = InstancePredictions.from_full_masks("b", [0, 0], [1, 1], np.zeros((2, 4)), m)
    assert p.masks[0].shape == (2, 3) and (p.masks[0] == 255).all()
    e = InstancePredictions.from_full_masks("e", [], [], np.zeros((0, 4)), np.zeros((0, 8, 9)))
    assert len(e) == 0 and e.shape == (8, 9)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        InstancePredictions.from_full_masks("e", [0], [1], np.zeros((1, 4)), np.zeros((8, 9)))


def test_quantize():
    np.testing.assert_array_equal(P.quantize(np.array([-1, 0, 0.5, 1, 2.0])), [0, 0, 128, 255, 255])
    np.testing.assert_array_equal(P.quantize(np.array([True, False])), [255, 0])


@pytest.mark.parametrize("change, match", [
    (dict(scores=[0.5, 0.5]), "mismatched lengths"),
    (dict(classes=[0, -1, 2]), "classes must be >= 0"),
    (dict(mask_boxes=[[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 51, 2]]), "instance 2: mask_box"),
    (dict(masks=[np.zeros((2, 2), np.uint8)] * 3), "instance 0: mask shape"),
    (dict(masks=[np.zeros((1, 1), np.float32)] * 3), "instance 0: mask dtype float32"),
    (dict(image_id="a/b"), "image_id must be"),
    (dict(scores=[0.1, np.nan, 0.3]), "NaN"),
])
def test_invalid_construction(change, match):
    kwargs = dict(image_id="x", height=40, width=50, classes=[0, 1, 2], scores=[0.1, 0.2, 0.3],
                  boxes=np.zeros((3, 4)), mask_boxes=[[0, 0, 1, 1]] * 3, masks=[np.zeros((1, 1), np.uint8)] * 3)
    kwargs.update(change)
    with pytest.raises(ValueError, match=match):
        InstancePredictions(**kwargs)


def test_iter_dir_sorted_and_filtered(tmp_path):
    for k, image_id in enumerate(["c3", "a1", "b2"]):
        P.save(make_pred(image_id, n=k + 1, seed=k), tmp_path)
    P.write_meta(tmp_path, {"fold": 0})
    (tmp_path / ".c3.npz.abc.tmp").write_bytes(b"partial")  # leftover of an interrupted write: ignored
    it = P.iter_dir(tmp_path)
    assert not isinstance(it, list)  # a generator: one image at a time
    got = list(it)
    assert [p.image_id for p in got] == ["a1", "b2", "c3"]
    assert [len(p) for p in got] == [2, 3, 1]
    assert P.image_ids(tmp_path) == ["a1", "b2", "c3"]
    assert [p.image_id for p in P.iter_dir(tmp_path, ids=["c3", "a1"])] == ["a1", "c3"]
    with pytest.raises(ValueError, match="no predictions for 1 requested"):
        list(P.iter_dir(tmp_path, ids=["a1", "zz"]))


def test_iter_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(P.iter_dir(tmp_path / "nope"))
    P.write_meta(tmp_path, {})
    with pytest.raises(ValueError, match="holds no .npz"):
        list(P.iter_dir(tmp_path))
    P.save(make_pred("a"), tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="notes.txt: foreign file"):
        list(P.iter_dir(tmp_path))


def test_load_foreign_and_corrupt_files(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"junk.npz: not a cellkit predictions file \(not an .npz archive\)"):
        P.load(junk)
    other = tmp_path / "other.npz"
    np.savez_compressed(other, a=np.zeros(3))
    with pytest.raises(ValueError, match=r"other.npz: not a cellkit predictions file \(missing keys"):
        P.load(other)
    junk.unlink()
    with pytest.raises(ValueError, match="other.npz: not a cellkit"):
        list(P.iter_dir(tmp_path))
    with pytest.raises(FileNotFoundError):
        P.load(tmp_path / "absent.npz")


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    data.update(changes)
    np.savez_compressed(path, **data)


def test_load_inconsistent_arrays(tmp_path):
    path = P.save(make_pred("img0", n=4), tmp_path)
    _rewrite(path, scores=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="img0.npz: .*mismatched lengths"):
        P.load(path)
    path = P.save(make_pred("img0", n=4), tmp_path)
    with np.load(path) as npz:
        buf = npz["mask_data"]
    _rewrite(path, mask_data=buf[:-1])
    with pytest.raises(ValueError, match="img0.npz: mask_data holds"):
        P.load(path)
    path = P.save(make_pred("img0", n=4), tmp_path)
    _rewrite(path, format=np.array("something/else"))
    with pytest.raises(ValueError, match="format 'something/else'"):
        P.load(path)
    path = P.save(make_pred("img0", n=4), tmp_path)
    os.replace(path, tmp_path / "renamed.npz")
    with pytest.raises(ValueError, match="does not match the file name"):
        P.load(tmp_path / "renamed.npz")


def test_atomic_save_leaves_old_file_on_failure(tmp_path, monkeypatch):
    good = make_pred("img0", n=2)
    path = P.save(good, tmp_path)
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "savez_compressed", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        P.save(make_pred("img0", n=5, seed=3), tmp_path)
    assert path.read_bytes() == before
    assert sorted(f.name for f in tmp_path.iterdir()) == ["img0.npz"]


def test_meta_round_trip_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="meta.json"):
        P.read_meta(tmp_path)
    P.write_meta(tmp_path, {"config": "cascade.yaml", "fold": np.int64(2), "tta": {"hflip": True},
                            "weights": tmp_path / "model.pth"})
    meta = P.read_meta(tmp_path)
    assert meta["fold"] == 2 and meta["tta"] == {"hflip": True} and meta["weights"].endswith("model.pth")
    from cellkit import __version__
    assert meta["cellkit_version"] == __version__
    (tmp_path / "meta.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        P.read_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{bad")
    with pytest.raises(ValueError, match="invalid JSON"):
        P.read_meta(tmp_path)
    with pytest.raises(ValueError, match="must be a dict"):
        P.write_meta(tmp_path, [1])


def test_size_realistic(tmp_path):
    """500 instances with smooth 20x20..60x60 crops on a 520x704 image stay well under 0.5 MB."""
    p = make_pred("big", n=500, shape=(520, 704), sizes=(20, 60), seed=1)
    path = P.save(p, tmp_path)
    size = path.stat().st_size
    raw = sum(m.size for m in p.masks)
    assert size < 0.5e6, size
    assert size < raw  # compression works on the crop buffer
    assert_same(p, P.load(path))
